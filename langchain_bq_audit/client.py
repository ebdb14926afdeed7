"""Build the google-cloud-bigquery client a writer uses (no network until it is used)."""

from __future__ import annotations

import os
from typing import Any

from .settings import AuditSettings

#: Project used with an emulator when none is configured.
LOCAL_PROJECT = "local"


def project_hint(settings: AuditSettings, client: Any = None) -> str:
    """The project rows will go to, known without network (names the spool folder).

    Settings, then the client's, then the environment; with ADC and nothing set the real
    project is only known once the client is made, so this says `default`.
    """
    project = settings.project or getattr(client, "project", None)
    if project:
        return str(project)
    env = os.environ.get("GOOGLE_CLOUD_PROJECT") or os.environ.get("GCLOUD_PROJECT")
    if env:
        return env
    return LOCAL_PROJECT if settings.emulator_endpoint else "default"


def destination_id(settings: AuditSettings, client: Any = None) -> str:
    """`project.dataset.table` of the settings' destination: names its writer, its spool
    folder, and what `bq-audit replay` and `stats` report. Known without network."""
    return f"{project_hint(settings, client)}.{settings.dataset}.{settings.table}"


def make_client(settings: AuditSettings) -> Any:
    """A `bigquery.Client`: the emulator's (anonymous) when one is configured, else ADC."""
    from google.cloud import bigquery

    endpoint = settings.emulator_endpoint
    if endpoint:
        from google.api_core.client_options import ClientOptions
        from google.auth.credentials import AnonymousCredentials

        project = settings.project or os.environ.get("GOOGLE_CLOUD_PROJECT") or LOCAL_PROJECT
        return bigquery.Client(
            project=project,
            credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
            client_options=ClientOptions(api_endpoint=endpoint),
            location=settings.location,
        )
    return bigquery.Client(project=settings.project, location=settings.location)
