"""Ships ``megatron_ep_plugins.pth`` into site-packages (zero-code activation, see autoload.py).

Metadata lives in pyproject.toml (PEP 621; the version is ``megatron_ep_plugins.__version__``). This
file only puts the .pth at the root of the wheel, for regular installs (``build_py``, also when the
wheel is built from the sdist: MANIFEST.in ships the .pth) and for editable installs (PEP 660
``editable_wheel``) alike. The .pth does nothing unless ``MCORE_EP_BACKEND`` is set.
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = "megatron_ep_plugins.pth"
PTH_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), PTH)


class build_py_with_pth(build_py):
    def run(self):
        super().run()
        if not self.editable_mode:
            self.copy_file(PTH_SOURCE, os.path.join(self.build_lib, PTH), preserve_mode=0)


class editable_wheel_with_pth(editable_wheel):
    def _select_strategy(self, *args, **kwargs):
        inner = super()._select_strategy(*args, **kwargs)

        class WithPth:
            def __enter__(self):
                inner.__enter__()
                return self

            def __exit__(self, *exc):
                return inner.__exit__(*exc)

            def __call__(self, wheel, files, mapping):
                inner(wheel, files, mapping)
                with open(PTH_SOURCE, "rb") as fh:
                    wheel.writestr(PTH, fh.read())

        return WithPth()


setup(cmdclass={"build_py": build_py_with_pth, "editable_wheel": editable_wheel_with_pth})
