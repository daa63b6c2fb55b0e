"""`python -m chattune` (also what `torchrun -m chattune` runs)."""

from chattune.cli import main

if __name__ == "__main__":
    main()
