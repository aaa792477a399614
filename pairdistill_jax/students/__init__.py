"""Student kinds: `get(config.model.kind)` gives everything in which kinds differ (students.registry).

colbert.py and dpr.py are the built-in kinds; a new kind is one module like them.
"""

from pairdistill_jax.students.registry import (Student, StudentTokenizer, get, kinds, make_student, register,
                                               title_separator)

__all__ = ["Student", "StudentTokenizer", "get", "kinds", "make_student", "register", "title_separator"]
