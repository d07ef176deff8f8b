"""`python -m svlab up|down|status|migrate|query`: the same commands as `svmotion lab`."""
from svlab.cli import lab

lab(prog_name="python -m svlab")
