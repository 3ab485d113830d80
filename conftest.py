"""Root conftest: the framework's own tests use pytester to run hil's plugin end to end."""

pytest_plugins = ["pytester"]
