"""Build the optional C speedup of the pgoutput decoder.

Everything else is in pyproject.toml. The extension is optional: where it
cannot be compiled, walex installs and runs on its pure-Python decoder.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "walex.pgoutput._speedups",
            ["src/walex/pgoutput/_speedups.c"],
            optional=True,
        )
    ]
)
