"""memloc: where in a network are mislabeled (memorised) training examples stored?

The public API. Every analysis takes a run (:func:`load`) or a model plus data, keyword-only
options, and returns a :class:`Result` (an ``xarray.Dataset`` with a schema; ``.save(path)``).
"""
__version__ = "0.2.0"

import warnings

# ``python -m memloc.rewind`` imports this package (and so memloc.rewind) before running the module
# as __main__; runpy's warning about that is harmless here.
warnings.filterwarnings("ignore", message=r".*found in sys\.modules after import of package 'memloc'",
                        category=RuntimeWarning)

from .agreement import score_agreement  # noqa: E402
from .data import Data, ExampleSet, make_data, register_data  # noqa: E402
from .detect import detect  # noqa: E402
from .dropout import ExampleTiedDropout, example_ids, insert_example_tied_dropout, set_mode  # noqa: E402
from .etd import evaluate_dropout  # noqa: E402
from .experiments import clean, jtt, prune  # noqa: E402
from .errors import MemlocError  # noqa: E402
from .flip import flip  # noqa: E402
from .forgetting import forgetting_order  # noqa: E402
from .gradients import gradients  # noqa: E402
from .importance import importance  # noqa: E402
from .inputs import WithIds  # noqa: E402
from .label_issues import find_label_issues  # noqa: E402
from .models import register_model  # noqa: E402
from .recorder import Recorder  # noqa: E402
from .report import report  # noqa: E402
from .results import Result, load_result  # noqa: E402
from .retrain import retrain  # noqa: E402
from .rewind import rewind  # noqa: E402
from .run import Run, load  # noqa: E402
from .scores import scores  # noqa: E402
from .stream import StreamedSet, set_streaming, streaming  # noqa: E402
from .train import train  # noqa: E402
from .unlearn import unlearn  # noqa: E402

__all__ = ["load", "Run", "Recorder", "WithIds", "Data", "ExampleSet", "StreamedSet", "set_streaming", "streaming",
           "make_data", "register_data",
           "register_model", "Result", "load_result", "MemlocError", "train", "gradients", "rewind", "retrain",
           "flip", "scores", "score_agreement", "detect", "find_label_issues", "prune", "clean", "jtt",
           "importance", "unlearn", "forgetting_order",
           "evaluate_dropout", "report", "ExampleTiedDropout",
           "insert_example_tied_dropout", "set_mode", "example_ids"]
