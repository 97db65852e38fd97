"""The functions, classes and process targets the tests send to child processes.

They live at module level here, not in the test modules, because ``spawn`` and
``forkserver`` children import them by name (``tasks.basic.square``).  pytest puts
``tests/`` on ``sys.path`` (the test directory has no ``__init__.py``) and multiprocessing
passes ``sys.path`` on to the children it starts; a script run in a subprocess needs
``tests/`` on ``PYTHONPATH``.  One module per test area; this file stays empty so that a
child imports only the module its task is in.
"""
