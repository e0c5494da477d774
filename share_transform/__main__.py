"""``python -m share_transform``: the same commands as ``sharetx``."""

from .cli import main

if __name__ == "__main__":
    main()
