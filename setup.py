"""Build the optional C speedup of the pgoutput decoder.

Everything else is in pyproject.toml. The extension is optional: where it
cannot be compiled, walex installs and runs on its pure-Python decoder.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "walex._accel._speedups",
            ["src/walex/_accel/_speedups.c"],
            optional=True,
        )
    ]
)
