"""``python -m sapguard.cli``: the `sap` command (for launchers that start a module, e.g.
``torchrun --nproc-per-node N -m sapguard.cli extract ...``)."""

from sapguard.cli import app

if __name__ == "__main__":
    app(prog_name="sap")
