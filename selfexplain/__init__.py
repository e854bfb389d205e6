"""selfexplain: train language models to explain their own computations, at cluster scale.

Installed, `selfexplain.groundtruth`, `.training`, `.eval` and `.distributed` live inside this package
(setup.py maps the repository's top-level folders here, so nothing else lands at the top level of an
environment). In a source checkout used without installing (a Ray job's working directory, a GPU machine
given the tree and a folder of wheels) those folders sit beside this one, so the package also looks there.
"""
from __future__ import annotations

import os

__version__ = "0.2.0"

_HERE = os.path.dirname(os.path.abspath(__file__))
if not os.path.isdir(os.path.join(_HERE, "groundtruth")):
    __path__.append(os.path.dirname(_HERE))  # type: ignore[name-defined]  # noqa: F821


def __getattr__(name: str):
    """`from selfexplain import Explainer` without importing torch for every `import selfexplain`."""
    if name == "Explainer":
        from selfexplain.eval.explainer_api import Explainer

        return Explainer
    raise AttributeError(f"module 'selfexplain' has no attribute {name!r}")
