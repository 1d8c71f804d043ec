"""The full-screen chat (`rtlocal chat` on a terminal): app.py, screens/ and widgets/."""
