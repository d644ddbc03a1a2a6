"""Not the package: this folder is the llama_fast *repository*; the package is ./llama_fast.

Python runs this file only when it imports the repository folder itself as a package: a clone
named ``llama_fast`` and Python started in the folder above it, whose path comes first on
``sys.path``. Without this file that folder would be taken silently as an empty namespace package,
and the first use would fail with "module 'llama_fast' has no attribute 'patch'". Instead the
import is handed to the installed llama_fast, or fails with a message that says what happened.
Under any other name (pytest imports this file as the package of the folder it collects from,
named after the clone) it does nothing; pytest runs with --import-mode=importlib (pytest.ini), in
which a clone named llama_fast does not make it compare this file with the installed package.
"""

import importlib
import os
import sys


def _installed_package():
    """Import the installed llama_fast with the folder above this repository out of the way."""
    here = os.path.realpath(os.path.dirname(os.path.abspath(__file__)))
    name = os.path.basename(os.path.dirname(os.path.abspath(__file__)))
    shadowing = [p for p in sys.path if os.path.realpath(os.path.join(p or os.getcwd(), name)) == here]
    saved_path, saved_module = list(sys.path), sys.modules.pop(name)
    sys.path[:] = [p for p in sys.path if p not in shadowing]
    try:
        return importlib.import_module("llama_fast")
    except ImportError as exc:
        sys.modules[name] = saved_module
        raise ImportError(
            f"`import {name}` found the llama_fast repository folder {here} (Python was started in the folder "
            "above it), and no installed llama_fast to use instead. Install it (bash install.sh, or pip install "
            "-e . in the repository) or start Python from another folder."
        ) from exc
    finally:
        sys.path[:] = saved_path


if __name__ == "llama_fast":
    # The import system returns whatever sys.modules holds for the name once this file has run.
    sys.modules[__name__] = _installed_package()
