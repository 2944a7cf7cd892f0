"""The Airflow plugin: privrec's pages (``app.create_app``) mounted in the API server at
``/privrec``, behind Airflow's authentication. Registered by the ``airflow.plugins`` entry
point in pyproject.toml, so every Airflow process of an installation that has privrec loads it."""

from __future__ import annotations

from typing import ClassVar

from airflow.plugins_manager import AirflowPlugin

from privrec_pipeline.airflow_plugin import listener
from privrec_pipeline.airflow_plugin.app import PREFIX, create_app


class PrivrecPlugin(AirflowPlugin):
    name = "privrec"
    listeners: ClassVar[list] = [listener]  # each nightly run's note names its data day
    fastapi_apps: ClassVar[list] = [{"app": create_app(), "url_prefix": PREFIX, "name": "privrec reports"}]
    # In the UI's navigation, shown in an iframe of the UI (same origin: the session cookie goes along).
    external_views: ClassVar[list] = [
        {"name": "Privacy budget", "href": f"{PREFIX.lstrip('/')}/budget", "destination": "nav",
         "url_route": "privacy-budget", "category": "browse"},
        {"name": "Models", "href": f"{PREFIX.lstrip('/')}/models", "destination": "nav",
         "url_route": "privrec-models", "category": "browse"},
    ]
