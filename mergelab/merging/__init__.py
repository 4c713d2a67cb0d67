"""The merge rules as pure tensor math on one parameter at a time: no I/O, no Lightning."""
