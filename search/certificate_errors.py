"""The three ways a certificate fails: unusable (exit 2), a checkpoint unusable (exit 2), or its claim contradicted
by its evidence (exit 1). Raised by the schema (search/certificate_schema.py), the checkpoint files
(search/checkpoint.py) and verification (search/certificate.py)."""

from __future__ import annotations


class CertificateError(ValueError):
    """A certificate that cannot be used: too big, not UTF-8 or JSON, a field missing or of the wrong type, a
    checkpoint missing, or an option that does not fit it (exit 2)."""


class CheckpointError(RuntimeError):
    """A checkpoint that is not ours, is damaged, or holds objects that weights_only loading refuses (exit 2)."""


class EvidenceMismatch(RuntimeError):
    """A certificate whose claim its evidence contradicts (exit 1): the field, the claim, and what was found."""

    def __init__(self, field_name: str, claimed: str, found: str):
        super().__init__(f"{field_name}: the certificate says {claimed}, but {found}")
        self.field_name = field_name
