"""``python -m gig``: the command line (so ``torchrun -m gig`` and ``python -m gig`` work without the
``gig`` script on PATH)."""

from .cli import app

app(prog_name="gig")
