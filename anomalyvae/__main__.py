"""``python -m anomalyvae`` runs the command line (also what ``torchrun -m anomalyvae`` uses)."""

from anomalyvae.cli import main

if __name__ == "__main__":
    main()
