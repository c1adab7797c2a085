"""`python -m slides.analyze`: the slide command line under its first name (see :mod:`slides.__main__`)."""

from slides.__main__ import main

if __name__ == "__main__":
    main()
