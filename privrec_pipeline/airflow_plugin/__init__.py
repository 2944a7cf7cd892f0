"""privrec inside the Airflow UI: the plugin (``plugin.PrivrecPlugin``, registered by the
``airflow.plugins`` entry point) and its pages (``app``)."""
