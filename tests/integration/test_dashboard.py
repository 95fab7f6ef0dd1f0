"""The dashboard in a real browser (headless Chromium through Selenium) against
real clusters: login, every node, a job to SUCCEEDED with its logs, an actor, a
placement group, the task stream, the metrics charts, the stop button, and
the refusals (a wrong token; a cross-site form POST without the CSRF header).

Set MESHRAY_DASHBOARD_SCREENSHOTS=<dir> to keep the screenshots (the README's
come from here); otherwise they go to the test's tmp_path.
"""
from __future__ import annotations

import http.server
import os
import pathlib
import shutil
import tempfile
import threading

import pytest

from tests.helpers import wait_for

selenium = pytest.importorskip("selenium", reason="pip install selenium (the test extra)")

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                       reason="needs Chromium and its driver: apt-get install chromium "
                              "chromium-driver"),
    pytest.mark.timeout(300),
]
PAGE_TIMEOUT_S = 90.0


def _chromium_dirs() -> set:
    return {name for name in os.listdir("/tmp") if name.startswith("org.chromium.Chromium.")}


@pytest.fixture
def browser():
    """A headless Chromium whose profile and temporary files (its singleton
    socket dir among them, which it leaves in $TMPDIR) live in a directory of
    their own, removed afterwards: nothing is left in /tmp. The directory is
    short-named, since a unix socket's path must stay under 108 bytes."""
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="mr-chromium-"))
    before = _chromium_dirs()
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1400,900", "--no-first-run", "--disable-extensions",
                 f"--user-data-dir={scratch / 'profile'}"):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER,
                                      env={**os.environ, "TMPDIR": str(scratch)})
    driver = webdriver.Chrome(service=service, options=options)
    yield driver
    driver.quit()
    shutil.rmtree(scratch, ignore_errors=True)
    assert _chromium_dirs() <= before, "the browser left temporary dirs in /tmp"


def shots_dir(tmp_path) -> str:
    path = os.environ.get("MESHRAY_DASHBOARD_SCREENSHOTS") or str(tmp_path)
    os.makedirs(path, exist_ok=True)
    return path


def dashboard_url(cluster, node=None) -> str:
    node = node or cluster.head_node
    record = wait_for(lambda: cluster.engine.registered().get(node.node_id), timeout=30)
    return f"http://127.0.0.1:{record['DashboardPort']}"


def until(driver, condition, message: str):
    """Wait for `condition`; an element the page re-rendered meanwhile means "not yet"."""
    return WebDriverWait(driver, PAGE_TIMEOUT_S, poll_frequency=0.2,
                         ignored_exceptions=(StaleElementReferenceException,)).until(
        lambda d: condition(d), message=message)


def click(driver, by, value) -> None:
    """Click the element, found afresh if the page re-rendered it between find and click."""
    until(driver, lambda d: d.find_element(by, value).click() or True, f"clicked {value}")


def texts(driver, selector: str) -> list[str]:
    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, selector)]


def log_in(driver, base: str, token: str) -> None:
    driver.get(base + "/")
    until(driver, lambda d: d.find_element(By.ID, "login").is_displayed(), "the login page")
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.ID, "login-button").click()
    until(driver, lambda d: d.find_element(By.ID, "app").is_displayed(), "the app after login")


def test_login_nodes_job_logs_actor_group_tasks_and_charts(cluster, browser, tmp_path):
    from meshray.job_submission import JobSubmissionClient
    cluster.add_node(num_cpus=1)
    cluster.add_node(num_cpus=1, labels={"zone": "east"})
    base = dashboard_url(cluster)
    shots = shots_dir(tmp_path)

    log_in(browser, base, cluster.token)
    node_ids = {node.node_id for node in [cluster.head_node, *cluster.worker_nodes]}
    until(browser, lambda d: {r.get_attribute("data-node-id") for r in d.find_elements(
        By.CSS_SELECTOR, "#nodes-table tbody tr")} == node_ids, "all three nodes listed")
    until(browser, lambda d: texts(d, "#nodes-table td.state") == ["ALIVE"] * 3,
          "three ALIVE nodes")
    until(browser, lambda d: "zone=east" in d.find_element(By.ID, "nodes-table").text,
          "the east node's label")
    # Lease health from each node's own metrics (sampled every few seconds).
    until(browser, lambda d: texts(d, "#nodes-table td.lease") == ["held"] * 3,
          "every node holds its etcd lease")
    others = {dashboard_url(cluster, node) + "/" for node in cluster.worker_nodes}
    until(browser, lambda d: others <= {e.get_attribute("href") for e in d.find_elements(
        By.CSS_SELECTOR, "a.node-dashboard-link")}, "a link to each other node's dashboard")
    browser.save_screenshot(os.path.join(shots, "dashboard-nodes.png"))

    client = JobSubmissionClient(base, token=cluster.token)
    job_id = client.submit_job(entrypoint="echo dashboard-log-line; echo second-line")
    browser.get(f"{base}/#jobs")
    until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, f'tr[data-job-id="{job_id}"]'),
          "the job in the jobs table")
    until(browser, lambda d: "SUCCEEDED" in d.find_element(
        By.CSS_SELECTOR, f'tr[data-job-id="{job_id}"] td.state').text, "the job SUCCEEDED")
    click(browser, By.LINK_TEXT, job_id)
    until(browser, lambda d: "second-line" in d.find_element(By.ID, "job-logs").text,
          "the job's logs followed in the page")
    assert "dashboard-log-line" in browser.find_element(By.ID, "job-logs").text
    until(browser, lambda d: d.find_element(By.ID, "job-status").text == "SUCCEEDED",
          "the job page's status")
    assert not browser.find_element(By.ID, "stop-job").is_enabled()

    ray = cluster.connect()

    @ray.remote(num_cpus=0)
    class Counter:
        def ping(self):
            return "pong"

    @ray.remote(num_cpus=0)
    def square(x):
        return x * x

    from meshray.util.placement_group import placement_group
    actor = Counter.options(name="dash-counter").remote()
    assert ray.get(actor.ping.remote()) == "pong"
    group = placement_group([{"CPU": 0.5}, {"CPU": 0.5}], strategy="STRICT_SPREAD",
                            name="dash-group")
    ray.get(group.ready(), timeout=60)
    assert ray.get([square.remote(i) for i in range(20)]) == [i * i for i in range(20)]

    browser.get(f"{base}/#actors")
    until(browser, lambda d: any("dash-counter" in t and "ALIVE" in t
                                 for t in texts(d, "#actors-table tbody tr")),
          "the actor, ALIVE")
    browser.get(f"{base}/#pgs")
    until(browser, lambda d: any("dash-group" in t and "CREATED" in t
                                 for t in texts(d, "#pgs-table tbody tr")),
          "the placement group, CREATED")
    until(browser, lambda d: len(bundles := texts(d, "#pgs-table li.bundle")) == 2
          and all("(unplaced)" not in b for b in bundles), "both bundles placed")

    browser.get(f"{base}/#tasks")
    until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, '#task-summary-table tr[data-func]')
          and any("square" in t for t in texts(d, "#task-summary-table tr[data-func]")),
          "the per-function summary")
    until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#task-stream rect.task-slice"),
          "task slices in the task stream")
    browser.save_screenshot(os.path.join(shots, "dashboard-tasks.png"))

    browser.get(f"{base}/#metrics")
    until(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#chart-cpu polyline.series")) == 3
          and all(" " in p.get_attribute("points") for p in d.find_elements(
              By.CSS_SELECTOR, "#chart-cpu polyline.series")),
          "a CPU line per node, with two samples or more")
    browser.save_screenshot(os.path.join(shots, "dashboard-metrics.png"))


class _CrossSite(http.server.BaseHTTPRequestHandler):
    """A page on another origin whose form posts to the dashboard (a CSRF attempt)."""
    target = ""

    def do_GET(self):
        body = (f'<form id="f" method="post" action="{self.target}">'
                '<input name="x" value="1"></form>'
                '<script>document.getElementById("f").submit()</script>').encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


def test_wrong_token_stays_on_login_and_a_cross_site_post_is_refused(cluster, browser):
    from meshray.job_submission import JobSubmissionClient
    base = dashboard_url(cluster)
    browser.get(base + "/")
    until(browser, lambda d: d.find_element(By.ID, "login").is_displayed(), "the login page")
    browser.find_element(By.ID, "token").send_keys("not-the-token")
    browser.find_element(By.ID, "login-button").click()
    until(browser, lambda d: "login refused" in d.find_element(By.ID, "login-error").text,
          "the refusal on the login page")
    assert browser.find_element(By.ID, "login").is_displayed()
    assert not browser.find_element(By.ID, "app").is_displayed()

    log_in(browser, base, cluster.token)
    client = JobSubmissionClient(base, token=cluster.token)
    job_id = client.submit_job(entrypoint="sleep 120")
    wait_for(lambda: client.get_job_status(job_id).value == "RUNNING", timeout=90,
             message="the job to run")

    class Handler(_CrossSite):
        target = f"{base}/api/jobs/{job_id}/stop"
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        # Same host, another port: the browser sends the session cookie
        # (SameSite is per site, not per port), but not the CSRF header.
        browser.get(f"http://127.0.0.1:{server.server_port}/")
        until(browser, lambda d: "CSRF check failed" in d.find_element(By.TAG_NAME, "body").text,
              "the dashboard's refusal of the cross-site POST")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert client.get_job_status(job_id).value == "RUNNING"
    assert not client._request("GET", f"/api/jobs/{job_id}").get("stop_requested")

    # The page's own stop button carries the CSRF token, and works.
    browser.get(f"{base}/#job/{job_id}")
    until(browser, lambda d: d.find_element(By.ID, "job-status").text == "RUNNING",
          "the job page")
    click(browser, By.ID, "stop-job")
    until(browser, lambda d: d.find_element(By.ID, "job-status").text == "STOPPED",
          "the job STOPPED from the page")
