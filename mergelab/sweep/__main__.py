"""``python -m mergelab.sweep FILE``: the same as ``mergelab sweep FILE``."""

from mergelab.sweep.runner import main

main()
