"""The on-failure notifier of privrec's DAGs (an Airflow ``BaseNotifier``).

Always logs the failure (task, run, try, the error's first line) at ERROR. With the
connection ``privrec_alerts_smtp`` (an SMTP connection) and ``PRIVREC_ALERT_EMAIL`` (comma
separated recipients) it also sends the message by email through the SMTP provider's
``SmtpNotifier``. The message names the task and the error only: no data, no key material
(privrec's errors never carry either).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from airflow.sdk import BaseNotifier

SMTP_CONN_ID = "privrec_alerts_smtp"
RECIPIENTS_ENV = "PRIVREC_ALERT_EMAIL"
log = logging.getLogger(__name__)


def failure_message(context: dict[str, Any]) -> tuple[str, str]:
    ti = context["ti"]
    error = str(context.get("exception") or "no exception recorded").strip().splitlines()
    first = error[0] if error else ""
    subject = f"privrec: {ti.dag_id}.{ti.task_id} failed ({ti.run_id})"
    return subject, f"{subject}, try {ti.try_number}: {first}"


class FailureNotifier(BaseNotifier):
    """Log every task failure; email it when an SMTP connection and recipients are configured."""

    template_fields = ()

    def notify(self, context: dict[str, Any]) -> None:
        from airflow.exceptions import AirflowNotFoundException
        from airflow.sdk import BaseHook

        subject, message = failure_message(context)
        log.error("%s", message)
        recipients = [r.strip() for r in os.environ.get(RECIPIENTS_ENV, "").split(",") if r.strip()]
        if not recipients:
            return
        try:
            BaseHook.get_connection(SMTP_CONN_ID)
        except AirflowNotFoundException:
            log.warning("%s is set but the connection %s is not: no email sent", RECIPIENTS_ENV, SMTP_CONN_ID)
            return
        from airflow.providers.smtp.notifications.smtp import SmtpNotifier

        SmtpNotifier(to=recipients, subject=subject, html_content=f"<p>{message}</p>",
                     smtp_conn_id=SMTP_CONN_ID).notify(context)
