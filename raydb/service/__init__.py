"""Training as a service: many subjects per job (``batch``) and trainings submitted over HTTP.

``batch`` (``raydb batch``), ``store`` (training records in the workspace), ``submission`` (checks of
an upload), ``photo_uris`` (photos named by ``s3://`` URI), ``errors`` (refusals with their own
status), ``queue`` (Ray jobs through the Jobs API), ``runner`` (a training job's entrypoint) and
``trainings`` (the operations the ingress's ``/v1/trainings`` routes call). See docs/service.md.
"""

from __future__ import annotations

__all__ = ["error_line"]


def error_line(exc: BaseException) -> str:
    """One line naming an error: its type and message (multi-line messages, such as an IngestError's
    per-file list, joined with '; '), for summaries and training status."""
    text = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return f"{type(exc).__name__}: {text}"
