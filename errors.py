"""Errors users see: one line each, naming the culprit, the choices and the fix."""


class RadioDistillError(Exception):
    """Base of every error the CLI prints as one line instead of a traceback."""


class TeacherSpecError(RadioDistillError):
    """A teacher spec is malformed, names an unknown model, or its weights are missing."""


class DatasetError(RadioDistillError):
    """The image dataset cannot be listed or its images are gone."""


class CacheLayoutError(RadioDistillError):
    """A store is missing, of another layout version, or built with other settings."""


class CacheIntegrityError(RadioDistillError):
    """A store's bytes fail a checksum, shape or finiteness check."""


class UnknownStudentError(RadioDistillError):
    """A student name is in neither this package's registry nor timm's."""


class TrainingError(RadioDistillError):
    """Training cannot start or cannot go on (incompatible resume, NaN loss...)."""


class EvaluationError(RadioDistillError):
    """`radio-eval` cannot evaluate a run (no run folder, no held-out samples, another store...)."""
