"""The dashboard in a real browser (headless Chromium, tests/browser.py) against the real
daemon started as a process: what a person logged in with a token sees and can do.

Each test saves screenshots to var/test-output/dashboard/; the one in docs/dashboard.png is
copied from there."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.browser import LAPTOP, PHONE, Browser, browser_session
from tests.process import DaemonFactory, DaemonProcess, daemon_factory

CONFIG = {
    "daemon": {"max_concurrent_jobs": 4},
    "budget": {"daily_usd": 1.0},
    "kinds": {
        "quick": {"handler": "tests.handlers:sleepy", "max_attempts": 1},
        "steps": {"handler": "tests.handlers:stepper", "timeout": "5m"},
        "hangs": {"handler": "tests.handlers:hang", "timeout": "1h"},
        "caller": {"handler": "tests.handlers:call_service", "max_attempts": 1},
    },
    "services": {
        "images": {"price_usd": 0.04, "breaker": {"failures": 3, "recovery": "10m"}},
    },
}


@pytest.fixture
def browser() -> Iterator[Browser]:
    yield from browser_session()


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[DaemonFactory]:
    yield from daemon_factory(tmp_path)


class Dashboard:
    """A running daemon, its URL, and tokens for an operator and two users."""

    def __init__(self, daemon: DaemonProcess) -> None:
        self.daemon = daemon
        port = daemon.logs("jobwarden ready")[0]["http_port"]
        self.url = f"http://127.0.0.1:{port}"
        with daemon.client() as admin:
            self.operator = admin.call("tokens", action="add", name="ops")["secret"]
            self.tokens = {
                name: admin.call("users", action="add", name=name)["token"]
                for name in ("alice", "bob")
            }

    def submit(self, kind: str, payload: dict, user: str = "alice", **options: object) -> int:
        with self.daemon.client() as admin:
            submitted = admin.call("submit", kind=kind, payload=payload, user=user, **options)
            return submitted["job"]["id"]

    def job(self, job_id: int) -> dict:
        with self.daemon.client() as admin:
            return admin.call("show", job=job_id)["job"]


@pytest.fixture
def dashboard(daemons: DaemonFactory) -> Dashboard:
    return Dashboard(daemons(CONFIG))


def job_ids_listed(browser: Browser) -> set[int]:
    return {int(link.text.lstrip("#")) for link in browser.find_all("#jobs-list tbody a")}


def progress_of(browser: Browser) -> int:
    return int(browser.find("#job-progress progress").get_attribute("value"))


def test_a_user_sees_their_own_jobs_and_not_anyone_elses(dashboard, browser):
    mine = {dashboard.submit("quick", {"seconds": 0}) for _ in range(3)}
    theirs = dashboard.submit("quick", {"seconds": 0}, user="bob")

    browser.log_in(dashboard.url, dashboard.tokens["alice"])
    browser.go("#/jobs")
    browser.wait_until(lambda: job_ids_listed(browser) == mine, f"jobs {sorted(mine)}")

    assert theirs not in job_ids_listed(browser)
    # A user has no operator pages to go to.
    assert not browser.find("nav a[href='#/breakers']").is_displayed()
    assert browser.script_errors() == []


def test_a_new_job_appears_in_the_list_without_a_reload(dashboard, browser):
    browser.log_in(dashboard.url, dashboard.operator)
    browser.go("#/jobs")
    browser.wait_for("#jobs-list table")
    browser.script("window.notReloaded = true")

    job_id = dashboard.submit("quick", {"seconds": 0})

    browser.wait_until(lambda: job_id in job_ids_listed(browser), f"job {job_id} listed")
    assert browser.script("return window.notReloaded") is True


def test_the_jobs_list_filters_pages_and_finds_a_job_by_id(dashboard, browser):
    failed = dashboard.submit("quick", {"fail": True})
    done = [dashboard.submit("quick", {"seconds": 0}) for _ in range(55)]
    browser.log_in(dashboard.url, dashboard.operator)

    browser.go("#/jobs?status=failed")
    browser.wait_until(lambda: job_ids_listed(browser) == {failed}, f"only job {failed}")

    browser.go("#/jobs?status=done")
    browser.wait_until(lambda: len(job_ids_listed(browser)) == 50, "a page of 50 jobs")
    first_page = job_ids_listed(browser)
    browser.click("a[rel=next]")
    browser.wait_until(lambda: job_ids_listed(browser) == set(done) - first_page, "the rest")

    browser.find("#find-id").send_keys(str(failed))
    browser.click("#find-id + button")
    browser.wait_for("h1", f"Job #{failed}")


def test_a_progress_bar_moves_live_until_the_job_is_done(dashboard, browser):
    job_id = dashboard.submit("steps", {"steps": 5, "step_seconds": 0.6})
    browser.log_in(dashboard.url, dashboard.tokens["alice"])
    browser.go(f"#/jobs/{job_id}")
    browser.wait_for("#job-progress progress")
    browser.script("window.notReloaded = true")
    seen = {progress_of(browser)}

    def moved() -> bool:
        seen.add(progress_of(browser))
        return len(seen - {0, 100}) >= 2

    browser.wait_until(moved, "the progress bar moving")
    browser.wait_for("#job-status", "done")

    assert progress_of(browser) == 100
    assert '"steps": 5' in browser.text("main")
    assert browser.script("return window.notReloaded") is True
    assert browser.script_errors() == []
    browser.screenshot("job-laptop", LAPTOP)
    browser.screenshot("job-phone", PHONE)


def test_a_job_page_shows_its_tags_start_time_and_what_it_runs_after(dashboard, browser):
    first = dashboard.submit("hangs", {})
    later = dashboard.submit("quick", {}, tags=["nightly", "books"], delay="1h", after=[first])
    browser.log_in(dashboard.url, dashboard.operator)
    browser.go(f"#/jobs/{later}")
    browser.wait_for("#job-tags", "nightly, books")

    facts = browser.text("dl.facts")
    assert f"#{first}" in facts
    assert "Starts at" in facts
    assert "waiting for job" in browser.text("main")
    assert browser.script_errors() == []


def test_pressing_cancel_cancels_the_running_job(dashboard, browser):
    job_id = dashboard.submit("hangs", {})
    browser.log_in(dashboard.url, dashboard.operator)
    browser.go(f"#/jobs/{job_id}")
    browser.wait_for("#job-status", "running")

    browser.click("#cancel")
    browser.driver.switch_to.alert.accept()

    browser.wait_for("#job-status", "canceled")
    assert dashboard.job(job_id)["status"] == "canceled"


def test_an_operator_retries_a_failed_job_from_its_page(dashboard, browser):
    job_id = dashboard.submit("quick", {"fail": True})
    browser.log_in(dashboard.url, dashboard.operator)
    browser.go(f"#/jobs/{job_id}")
    browser.wait_for("#job-error", "TEST_FAILURE")
    error_id = dashboard.job(job_id)["error"]["error_id"]
    assert error_id in browser.text("#job-error")

    browser.click("#retry")

    # The job runs again (and fails again, as its payload asks): the page lists the retry.
    browser.wait_for("#job-events", "MANUAL_RETRY")
    with dashboard.daemon.client() as admin:
        events = admin.call("show", job=job_id)["events"]
    assert any(event["data"].get("reason") == "MANUAL_RETRY" for event in events)


def test_a_tripped_breaker_shows_open_and_raises_an_alert_on_the_overview(dashboard, browser):
    browser.log_in(dashboard.url, dashboard.operator)
    browser.go("#/breakers")
    browser.wait_for("#state-images", "closed")

    browser.click("#trip-images")

    browser.wait_for("#state-images", "open")
    browser.go("#/")
    browser.wait_for("#alerts", "breaker_images")
    browser.go("#/breakers")
    browser.click("#reset-images")
    browser.wait_for("#state-images", "closed")


def test_the_overview_counts_jobs_by_kind_spend_and_failures_and_pauses_a_kind(dashboard, browser):
    finished = [dashboard.submit("quick", {"seconds": 0}) for _ in range(6)]
    finished += [dashboard.submit("caller", {"service": "images", "seconds": 0}) for _ in range(3)]
    finished.append(dashboard.submit("quick", {"fail": True}))
    browser.log_in(dashboard.url, dashboard.operator)
    browser.wait_until(
        lambda: all(dashboard.job(job)["status"] in ("done", "failed") for job in finished),
        "every job finished",
    )
    running = [dashboard.submit("hangs", {}) for _ in range(2)]

    browser.wait_for("#tile-running", "2 of 4")
    browser.wait_for("#tile-done", "9")
    browser.wait_for("#tile-failure-rate", "10.0%")
    # Three image calls at $0.04 of a $1.00 day.
    browser.wait_for("#budget-today", "$0.12 of $1.00")
    browser.go("#/budget")
    browser.wait_for("main", "Today by service: $0.12")
    assert "Today by user: $0.12" in browser.text("main")
    browser.screenshot("budget-laptop", LAPTOP)
    browser.go("#/")

    browser.click("#pause-quick")
    browser.wait_for("#resume-quick")
    queued = dashboard.submit("quick", {"seconds": 0})

    browser.wait_for("#tile-queued", "1")
    assert dashboard.job(queued)["status"] == "queued"
    assert all(dashboard.job(job)["status"] == "running" for job in running)
    browser.screenshot("overview-laptop", LAPTOP)
    browser.screenshot("overview-phone", PHONE)

    # The queued job's own page says where it stands and why it waits.
    browser.go(f"#/jobs/{queued}")
    browser.wait_for("#job-waiting", "Position 1 of 1")
    assert "paused" in browser.text("#job-waiting")


def test_the_live_stream_pauses_while_the_tab_is_hidden(dashboard, browser):
    # Long enough that a loaded machine still hides the tab before the job is done.
    job_id = dashboard.submit("steps", {"steps": 6, "step_seconds": 1.0})
    browser.log_in(dashboard.url, dashboard.operator)
    browser.go(f"#/jobs/{job_id}")
    browser.wait_for("#live", "live")

    browser.script(
        "Object.defineProperty(document, 'hidden', {value: true, configurable: true});"
        "document.dispatchEvent(new Event('visibilitychange'))"
    )
    browser.wait_for("#live", "paused")
    browser.wait_until(lambda: dashboard.job(job_id)["status"] == "done", "the job done")
    assert "done" not in browser.text("#job-status")

    browser.script(
        "Object.defineProperty(document, 'hidden', {value: false, configurable: true});"
        "document.dispatchEvent(new Event('visibilitychange'))"
    )
    browser.wait_for("#job-status", "done")


def test_a_wrong_token_is_refused_with_a_reason_and_logging_out_forgets_the_token(
    dashboard, browser
):
    browser.open(f"{dashboard.url}/ui/")
    browser.wait_for("#token").send_keys("jw_not-a-token")
    browser.click("form.login button[type=submit]")
    browser.wait_for("#login-problem", "not valid")

    browser.log_in(dashboard.url, dashboard.tokens["bob"])
    browser.click("#logout")
    browser.wait_for("#token")
    assert browser.script("return sessionStorage.length") == 0


def test_a_user_whose_token_is_replaced_is_asked_to_log_in_again(dashboard, browser):
    browser.log_in(dashboard.url, dashboard.tokens["alice"])
    browser.go("#/jobs")
    browser.wait_for("#jobs-list table")

    with dashboard.daemon.client() as admin:
        admin.call("users", action="token", name="alice")
    dashboard.submit("quick", {"seconds": 0})

    browser.wait_for("#login-problem", "no longer valid")
    assert browser.script("return sessionStorage.length") == 0


def test_the_users_page_shows_credits_limits_and_todays_jobs(dashboard, browser):
    with dashboard.daemon.client() as admin:
        admin.call("users", action="set", name="bob", credits=5, daily_limit=20)
    dashboard.submit("quick", {"seconds": 0})
    browser.log_in(dashboard.url, dashboard.operator)
    browser.go("#/users")

    def row(name: str) -> list[str]:
        cells = browser.find_all(f"main tbody tr:has(a[href='#/jobs?user={name}']) td")
        return [cell.text for cell in cells]

    # User, credits, reserved, spent, jobs today, daily limit, rate, running at most, state.
    browser.wait_until(lambda: row("alice")[4] == "1", "alice's job today")
    assert row("alice")[1:3] == ["unlimited", "0"]
    assert row("bob") == ["bob", "5", "0", "0", "0", "20", "default", "default", "enabled"]


def test_every_page_fits_a_phone_screen(dashboard, browser):
    dashboard.submit("quick", {"seconds": 0})
    browser.log_in(dashboard.url, dashboard.operator)
    for fragment, shows in [
        ("#/", "#tile-queued"),
        ("#/jobs", "#jobs-list table"),
        ("#/breakers", "#state-images"),
        ("#/budget", "#projection"),
        ("#/users", "main table"),
    ]:
        browser.go(fragment)
        browser.wait_for(shows)
        browser.screenshot(f"page{fragment.replace('#/', '-').rstrip('-')}-phone", PHONE)
        # Wide tables scroll inside their own box; the page itself never scrolls sideways.
        overflow = browser.script(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0, f"{fragment} is {overflow}px wider than a phone"
        browser.driver.set_window_size(*LAPTOP)
    assert browser.script_errors() == []
