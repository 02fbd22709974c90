"""``memloc status RUN``: what a run directory holds and what to run next (:func:`memloc.status`)."""
from ..core.registry import Command
from ..reporting.status import status


COMMAND = Command(
    name="status", order=12, group="runs", example="memloc status RUN",
    help="what a run holds: epochs, results (current or stale), work in progress, locks, what to run next",
    description="What a run directory holds, read without writing anything: dataset, model and the options that "
                "differ from the defaults; the epochs trained and the checkpoints present; whether training is "
                "complete, interrupted (with the command that continues it) or being written now; every result "
                "(when, with which options; stale when computed from another run or before the run was extended); "
                "the saved work of interrupted analyses; the locks held and by which process; the child runs; "
                "and what to run next. A run that cannot be read is one line and exit status 2.",
    arguments=lambda p: None, execute=lambda args: status(args.run), summary=lambda st, args: str(st), device=False)
