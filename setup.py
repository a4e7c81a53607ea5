"""What pyproject.toml cannot say stably: the gateway's compiled fast path (gateway/fastpath.py).

The extension is optional: where no C compiler or Python headers are found the install still
succeeds and the gateway relays on its pure-Python path.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "gateway._relay",
            ["gateway/_relay.c", "gateway/_heads.c"],
            depends=["gateway/_heads.h"],
            optional=True,
        )
    ]
)
