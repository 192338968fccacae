"""Baton's one import name. Its subpackages are the repository's top-level folders:
`baton.kernels` is `kernels/`, `baton.training` is `training/`, and so on (docs/DESIGN.md,
"Import names").

Why: the folders' own names are common words that other distributions also use at top level.
transformers 5.25 requires Hugging Face's `kernels` package and imports it while
`import transformers` runs; bitsandbytes asks it for `get_kernel`. When the repository root
leads sys.path (every `python agent.py ...`), a folder `kernels/` with an `__init__.py` would
be found first and break both. So Baton's `kernels/` has no `__init__.py` (a folder without
one never hides a real package of the same name), and every Baton import goes through this
package, whose search path is the repository root itself: `import baton.kernels.rmsnorm`
finds `kernels/rmsnorm.py` whether or not HF's `kernels` is installed. No module is renamed
or aliased in sys.modules; this is the ordinary `__path__` of a package (the import system's
documented hook for packages that span folders).
"""

from pathlib import Path

__path__ = [str(Path(__file__).resolve().parent.parent)]
