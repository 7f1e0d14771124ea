"""`python -m grpo_fast train ...` == `grpo-fast train ...`."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
