"""The Prefect server and the deployments: is the server there (and does it take our
credentials), URLs printed without credentials, Prefect's temporary server given time to
start, and the pipeline flow as a scheduled deployment (`seg serve`, `seg deploy`): its
schedule, its concurrency limit of one run at a time, its name, branch, limits and the
environment of its runs."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import ConfigError, SegError
from stages import runs
from stages.flows import pipeline_flow
from stages.supervise import crash_silent_runs, heartbeat_env

# collision strategies of a deployment's concurrency limit of 1, by the name users pick
COLLISIONS = ("skip", "queue")

# Without PREFECT_API_URL, Prefect starts a temporary server and waits 20 s for it
# (PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS); its first start creates and migrates a
# database, which took 30-37 s on a busy 2-core machine
EPHEMERAL_STARTUP_S = 120


class ServerUnreachable(SegError):
    """PREFECT_API_URL is set, but no Prefect API answers there."""


def check_server(timeout: float = 5.0) -> str | None:
    """The Prefect API URL when one is set and answers, None in ephemeral mode. The URL is
    returned for display: without user info or query (`api_display`).

    Raises ServerUnreachable in one line before any work starts, instead of Prefect's retries
    and traceback once the first flow run is being created: no server there, not a Prefect
    API, or credentials it refuses. `/health` answers without authentication, so the
    credentials are tried on an endpoint that needs them (`/admin/version`), the way Prefect's
    client sends them (PREFECT_API_AUTH_STRING, PREFECT_API_KEY, or user:password in the URL).
    """
    import httpx
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        return None
    shown = api_display(url)
    hint = "start one with `prefect server start --host 127.0.0.1`, or unset PREFECT_API_URL"
    base = url.rstrip("/")
    try:
        r = httpx.get(f"{base}/health", timeout=timeout)
        if r.status_code < 400:
            r = httpx.get(f"{base}/admin/version", timeout=timeout, headers=_auth_headers())
    except httpx.HTTPError as exc:
        reason = api_display(str(exc)) if "://" in str(exc) else str(exc)
        raise ServerUnreachable(
            f"Prefect API at {shown} is unreachable ({reason or type(exc).__name__}): {hint} to "
            "run without a server"
        ) from None
    if r.status_code in (401, 403):
        raise ServerUnreachable(
            f"Prefect API at {shown} refused the credentials (HTTP {r.status_code}): set "
            "PREFECT_API_AUTH_STRING=user:password (a server with PREFECT_SERVER_API_AUTH_STRING) "
            "or PREFECT_API_KEY (Prefect Cloud)"
        )
    if r.status_code >= 400:
        raise ServerUnreachable(
            f"{shown}/health answered HTTP {r.status_code}: not a Prefect API "
            "(PREFECT_API_URL usually ends in /api, e.g. http://127.0.0.1:4200/api)"
        )
    return shown


def _auth_headers() -> dict[str, str]:
    """The Authorization header Prefect's client sends (its auth string first, else its API
    key); none: httpx takes user:password from the URL, as Prefect's client does."""
    import base64

    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_KEY

    auth, key = PREFECT_API_AUTH_STRING.value(), PREFECT_API_KEY.value()
    if auth:
        return {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()}
    return {"Authorization": f"Bearer {key}"} if key else {}


def api_display(url: str) -> str:
    """A URL as it may be printed: no user:password, no query (pipeline.store.display)."""
    from pipeline.store import display

    return display(url)


def ui_url() -> str | None:
    """The UI's URL for "View at ..." lines: Prefect builds it from PREFECT_API_URL, user and
    password included; this one is without them (None without a server, or when the user
    set PREFECT_UI_URL)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    url = PREFECT_API_URL.value()
    if not url or os.environ.get(PREFECT_UI_URL.name):
        return None
    shown = api_display(url).rstrip("/")
    return shown.removesuffix("/api")


@contextmanager
def safe_urls() -> Iterator[None]:
    """PREFECT_UI_URL without credentials, in Prefect's settings and in the environment (the
    processes a run starts, the runs `seg serve` starts), for the block's duration."""
    from prefect.settings import PREFECT_UI_URL, temporary_settings

    url = ui_url()
    if url is None:
        yield
        return
    os.environ[PREFECT_UI_URL.name] = url
    try:
        with temporary_settings(updates={PREFECT_UI_URL: url}):
            yield
    finally:
        os.environ.pop(PREFECT_UI_URL.name, None)


@contextmanager
def ephemeral_startup(seconds: int = EPHEMERAL_STARTUP_S) -> Iterator[None]:
    """Give Prefect's ephemeral server at least `seconds` to start (a higher setting stays):
    in this context, and in the environment, which Prefect's worker threads and the runs'
    processes read."""
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as timeout
    from prefect.settings import temporary_settings

    value = max(timeout.value(), seconds)
    before = os.environ.get(timeout.name)
    os.environ[timeout.name] = str(value)
    try:
        with temporary_settings(updates={timeout: value}):
            yield
    finally:
        if before is None:
            os.environ.pop(timeout.name, None)
        else:
            os.environ[timeout.name] = before


def _schedule(cron: str, timezone: str | None):
    from prefect.client.schemas.schedules import CronSchedule

    try:
        return CronSchedule(cron=cron, timezone=timezone)  # validated: one-line errors
    except ValueError as exc:
        msg = exc.errors()[0]["msg"] if hasattr(exc, "errors") else str(exc)  # pydantic's
        msg = msg.removeprefix("Value error, ")
        raise ConfigError(f"--cron {cron!r} --timezone {timezone!r}: {msg}") from None


def concurrency(collision: str = "skip", limit: int = 1):
    """At most `limit` runs of the deployment at a time (one for the scheduled pipeline; a
    sweep's trials, `--parallel`). `skip`: a run due while another is still
    running is cancelled ("Deployment concurrency limit reached."); the next scheduled run
    catches up, and DVC reruns whatever became stale. `queue`: it waits for the slot
    (AwaitingConcurrencySlot) and runs after, usually finding everything up to date."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    strategies = {
        "skip": ConcurrencyLimitStrategy.CANCEL_NEW,
        "queue": ConcurrencyLimitStrategy.ENQUEUE,
    }
    if collision not in strategies:
        raise ConfigError(f"--collision {collision!r}: valid: {', '.join(COLLISIONS)}")
    return ConcurrencyLimitConfig(limit=limit, collision_strategy=strategies[collision])


def _deployment_kwargs(
    cron,
    timezone,
    overrides,
    collision,
    branch=None,
    limits=None,
    parallel: int = 1,
    promote: str | None = None,
) -> dict:
    from prefect.types.entrypoint import EntrypointType

    parameters: dict = {"overrides": list(overrides or [])}
    if branch:
        parameters["branch"] = branch
    if limits:
        parameters["limits"] = runs.Limits.parse(limits).as_dict()
    if promote:
        parameters["promote"] = promote
    return {
        "schedules": [_schedule(cron, timezone)] if cron else [],
        "concurrency_limit": concurrency(collision, parallel),
        "parameters": parameters,
        "description": "The DVC graph on a schedule: stale stages run, the rest are skipped."
        if cron
        else f"A sweep's trials: runs of the DVC graph, {parallel} at a time.",
        "tags": ["seg"],
        # `stages.flows.pipeline_flow` imports from the installed package in any project
        # folder; the run's working directory is the project (dvc.yaml, params.yaml)
        "entrypoint_type": EntrypointType.MODULE_PATH,
    }


def deployment(
    name: str,
    cron: str = "0 3 * * *",
    timezone: str | None = None,
    overrides: list[str] | None = None,
    collision: str = "skip",
    branch: str | None = None,
    limits: list[str] | None = None,
    promote: str | None = None,
):
    """The pipeline flow as a deployment on a cron schedule (what `seg serve` serves); each
    run works in a workspace of its own made from the serving process's clone."""
    return pipeline_flow.to_deployment(
        name,
        **_deployment_kwargs(cron, timezone, overrides, collision, branch, limits, 1, promote),
    )


def check_options(cron: str, timezone: str | None, collision: str, limits) -> None:
    """A deployment's options, checked before anything else (one line each)."""
    _schedule(cron, timezone)
    concurrency(collision)
    runs.Limits.parse(limits)


def default_name(root: Path) -> str:
    """A deployment's name when none is given: the repository's (its git remote's last path
    part, else the project folder's), so that two projects on one server do not share one
    deployment while every clone of one repository does."""
    remote = runs.git_remote(root, runs.Limits())
    base = remote[1].rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1] if remote else root.name
    base = base.removesuffix(".git")
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-") or "pipeline"


def workdir_variable(workdir: Path | str) -> str | None:
    """`$NAME` (an environment variable each worker sets to its clone) -> NAME, else None."""
    text = str(workdir)
    if not text.startswith("$"):
        return None
    name = text[1:].strip("{}")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ConfigError(f"--workdir {text!r}: expected $NAME, an environment variable name")
    return name


def deploy(
    pool: str,
    name: str,
    cron: str = "0 3 * * *",
    timezone: str | None = None,
    overrides: list[str] | None = None,
    collision: str = "skip",
    workdir: Path | str = ".",
    branch: str | None = None,
    limits: list[str] | None = None,
    parallel: int = 1,
    promote: str | None = None,
    notify: str | None = None,
):
    """Register the deployment on work pool `pool`: its runs execute on the pool's workers
    (`prefect worker start --pool POOL`), in `workdir` on the worker's machine (a clone of
    the project with this package installed). `workdir` `$NAME`: wherever the environment
    variable NAME points on the worker that picks the run up (clones at different paths: a
    pull step `set_working_directory` to `{{ $NAME }}`, resolved by each worker's flow-run
    process). Returns the deployment id."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            raise ConfigError(
                f"work pool {pool!r} not found: create it with "
                f"`prefect work-pool create {pool} --type process`"
            ) from None
    # `flow.deploy` would also list the pool's workers, a request this server version
    # rejects (422 on the client's null limit); registering the deployment is all it needs
    variable = workdir_variable(workdir)
    job_variables = {"env": run_env()}  # heartbeats (crash_silent_runs), a clean UI URL
    if not variable:
        job_variables["working_dir"] = str(workdir)
    deployment = pipeline_flow.to_deployment(
        name, work_pool_name=pool, job_variables=job_variables,
        **_deployment_kwargs(
            cron, timezone, overrides, collision, branch, limits, parallel, promote
        ),
    )  # fmt: skip
    if variable:
        # in the same request as the rest: a deployment applied without its pull step, then
        # updated, sends a run a worker picks up in between to a temporary folder
        deployment.storage = _WorkdirStep(variable)
    deployment_id = deployment.apply(work_pool_name=pool)
    crash_silent_runs(deployment_id, f"{pipeline_flow.name}/{name}")
    if notify:
        from stages.promotion import notify_on_regression

        notify_on_regression(deployment_id, f"{pipeline_flow.name}/{name}", notify)
    return deployment_id


class _WorkdirStep:
    """The pull step `set_working_directory` to `{{ $NAME }}` (each worker's clone), as the
    RunnerStorage a deployment takes its pull steps from: its runs go to that folder, and
    nothing is pulled or copied."""

    def __init__(self, variable: str):
        self.variable = variable

    def set_base_path(self, path: Path) -> None:
        pass

    @property
    def pull_interval(self) -> None:
        return None

    @property
    def destination(self) -> Path:
        return Path(".")

    async def pull_code(self) -> None:
        pass

    def to_pull_step(self) -> list[dict]:
        directory = "{{ $" + self.variable + " }}"
        return [{"prefect.deployments.steps.set_working_directory": {"directory": directory}}]


def run_env() -> dict[str, str]:
    """A deployment's runs' environment: heartbeats, and a UI URL without credentials (a
    worker's PREFECT_API_URL may hold user:password; Prefect would print it in "View at")."""
    url = ui_url()
    return {**heartbeat_env(), **({"PREFECT_UI_URL": url} if url else {})}
