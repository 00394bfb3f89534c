"""The dashboard in a real browser (Debian's chromium driven by Playwright) on the demo fleet:
log in, see the fleet, shed by a button and see the tile and chart change, acknowledge an alarm,
see a held-back device appear; and no data or action without a login."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from conftest import ROOT, running_grid
from gridpresence.config import load_fleet
from gridpresence.host.fleet import FleetBots
from gridpresence.host.grid import Grid
from gridpresence.xmpp.session import ConnectionInfo

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
SCREENSHOT = ROOT / "docs" / "dashboard.png"


@pytest_asyncio.fixture(scope="module")
async def demo(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Grid]:
    # As the README starts it; far-1 joins during the test.
    async with running_grid(load_fleet(ROOT / "bots" / "demo-fleet.toml"), tmp_path_factory.mktemp("dash-grid"),
                            without=["far-1", "meter-9"]) as grid:
        yield grid


def tls(grid: Grid) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(grid.server.certs.ca))  # the grid's own CA, verified


def password(grid: Grid, name: str = "alice") -> str:
    return grid.secrets.password(name)


async def test_nothing_without_a_login(demo: Grid) -> None:
    info = ConnectionInfo.load(demo.connection_file)
    assert info.dashboard and info.dashboard.startswith("https://")
    url = info.dashboard
    async with aiohttp.ClientSession() as http:
        async with http.get(url, ssl=tls(demo)) as r:
            page = await r.text()
            assert r.status == 200 and 'name="password"' in page
            assert "load-1" not in page and "Office HVAC" not in page  # the login form only
        for method, path in (("GET", "events"), ("GET", "api/history?device=load-1"), ("POST", "api/command"),
                             ("POST", "api/alarm")):
            async with http.request(method, url + path, ssl=tls(demo), json={"device": "load-1", "action": "shed"}) as r:
                assert r.status == 401, (path, r.status)
        async with http.post(url + "login", ssl=tls(demo), data={"operator": "alice", "password": "wrong"},
                             allow_redirects=False) as r:
            assert r.status == 403 and "Wrong operator or password" in await r.text()
            assert "gp_session" not in r.cookies
        async with http.post(url + "login", ssl=tls(demo), data={"operator": "billing", "password": password(demo, "billing")},
                             allow_redirects=False) as r:
            assert r.status == 403  # a grid account, but not an operator's


async def test_malformed_requests_get_clear_answers(demo: Grid) -> None:
    url = ConnectionInfo.load(demo.connection_file).dashboard
    assert url
    rng = random.Random(18)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:  # keep a cookie of 127.0.0.1
        async with http.post(url + "login", ssl=tls(demo), data={"operator": "alice", "password": password(demo)},
                             allow_redirects=False) as r:
            assert r.status == 303
        bodies: list[bytes] = [b"", b"{", b"[]", b'{"device": 1}', b'{"device": "load-1", "action": "explode"}',
                               b'{"device": "nosuch", "action": "read"}', b"\xff\xfe", b'{"device": "load-1"}']
        bodies += [bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64))) for _ in range(12)]
        for path in ("api/command", "api/alarm"):
            for body in bodies:
                async with http.post(url + path, ssl=tls(demo), data=body,
                                     headers={"Content-Type": "application/json"}) as r:
                    assert r.status in (400, 404), (path, body, r.status)
                    assert "error" in json.loads(await r.text())
        async with http.get(url + "api/history?device=load-1&minutes=abc", ssl=tls(demo)) as r:
            assert r.status == 400
        async with http.post(url + "api/command", ssl=tls(demo), json={"device": "gen-2", "action": "read"}) as r:
            assert r.status == 200 and (await r.json())["status"] == "executed"  # still serving


async def test_browser_login_shed_alarm_and_new_device(demo: Grid) -> None:
    playwright_api = pytest.importorskip("playwright.async_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium not installed: apt-get install chromium")
    url = ConnectionInfo.load(demo.connection_file).dashboard
    assert url
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            # The browser does not know the grid's private CA; the TLS itself is checked above.
            page = await (await browser.new_context(ignore_https_errors=True, viewport={"width": 1400, "height": 1000})).new_page()
            await page.goto(url)
            await page.fill("#operator", "alice")
            await page.fill("#password", "not-her-password")
            await page.click("button[type=submit]")
            await page.wait_for_selector("text=Wrong operator or password")
            assert await page.locator(".tile").count() == 0

            await page.fill("#operator", "alice")
            await page.fill("#password", password(demo))
            await page.click("button[type=submit]")
            await page.wait_for_selector("#tile-master")
            await page.wait_for_selector("#tile-load-1[data-state=on]", timeout=15_000)
            assert await page.locator(".tile").count() == len(demo.fleet.devices)
            # the hierarchy: load-1 sits in branch-a's children, under the master
            assert await page.locator("#tile-branch-a + .children #tile-load-1").count() == 1
            # a restricted-or-absent device's buttons say why they would be refused
            far = page.locator('#tile-far-1 button[data-action="shed"]')
            assert await far.is_disabled() and "no presence" in (await far.get_attribute("title") or "")

            await page.click("#tile-load-1 .name")  # its trend
            await page.click('#tile-load-1 button[data-action="shed"]')
            await page.wait_for_selector("#outcome:has-text('shed load-1: executed')", timeout=15_000)
            await page.wait_for_selector("#tile-load-1[data-state=off]", timeout=15_000)
            await page.wait_for_function(
                "document.querySelector('#trend-line') && +document.querySelector('#trend-line').dataset.points > 0",
                timeout=20_000)
            # the shed on the curve: the command's outcome and the state it left, both recorded
            await page.wait_for_selector("#chart text:text-is('shed')", timeout=20_000)
            await page.wait_for_selector("#chart text:text-is('off')", timeout=20_000)

            alarm = page.locator(".alarm").first
            await alarm.wait_for(timeout=30_000)
            await asyncio.sleep(2.0)  # the chart's next refresh after the shed
            SCREENSHOT.parent.mkdir(exist_ok=True)
            await page.screenshot(path=str(SCREENSHOT), full_page=True)  # the README's picture
            alarm_id = await alarm.get_attribute("id")
            await alarm.locator('button[data-verb="ack"]').click()
            await page.wait_for_selector("#outcome:has-text('Acknowledged')", timeout=15_000)
            await page.wait_for_selector(f"#{alarm_id}", state="detached", timeout=15_000)

            late = FleetBots(demo.fleet, demo.endpoint, demo.secrets, only=["far-1"], with_services=False,
                             data_dir=demo.data_dir)
            await late.start()
            try:
                await page.wait_for_selector("#tile-far-1[data-state=on]", timeout=20_000)
            finally:
                await late.stop()
        finally:
            await browser.close()


async def next_alarm(stream: aiohttp.ClientResponse, device: str, timeout: float = 20.0) -> dict[str, object]:
    """The first open alarm of `device` in the page's pushed snapshots."""
    async with asyncio.timeout(timeout):
        while True:
            line = await stream.content.readline()
            if line.startswith(b"data: "):
                for alarm in json.loads(line[6:])["alarms"]:
                    if alarm["name"] == device:
                        return alarm  # type: ignore[no-any-return]


async def test_not_a_fault_button_says_the_signed_verdict(demo: Grid) -> None:
    """The page's "not a fault" is the chat verb `not a fault ID`, signed by the operator: the device records it."""
    url = ConnectionInfo.load(demo.connection_file).dashboard
    assert url
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        async with http.post(url + "login", ssl=tls(demo), data={"operator": "bob@localhost",  # as `up` prints it
                                                                 "password": password(demo, "bob")}) as r:
            assert r.status == 200
        async with http.get(url + "events", ssl=tls(demo)) as stream:
            assert demo.bots is not None
            heaters = demo.bots.devices["load-2"]
            heaters.sim.utilisation = 0.9  # past the fleet's 80 %: the device's rules raise a warning
            try:
                alarm = await next_alarm(stream, "load-2")
            finally:
                heaters.sim.utilisation = 0.6
        assert alarm["kind"] == "high-loading" and alarm["level"] == "warning"
        async with http.post(url + "api/alarm", ssl=tls(demo),
                             json={"device": alarm["name"], "id": alarm["id"], "verb": "not-a-fault"}) as r:
            answer = await r.json()
        assert r.status == 200 and answer["done"], answer
        assert answer["reply"].startswith("Recorded:")


async def test_a_session_without_an_open_page_is_logged_out(demo: Grid, monkeypatch: pytest.MonkeyPatch) -> None:
    """A closed page must not leave its operator available to the devices (alarms would go nowhere)."""
    from gridpresence.services.dashboard import server

    monkeypatch.setattr(server, "IDLE_S", 0.5)
    url = ConnectionInfo.load(demo.connection_file).dashboard
    assert url and demo.dashboard is not None
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        async with http.post(url + "login", ssl=tls(demo), data={"operator": "bob", "password": password(demo, "bob")}) as r:
            assert r.status == 200
        async with http.get(url + "events", ssl=tls(demo)) as stream:
            await stream.content.readline()
            await asyncio.sleep(1.0)  # longer than IDLE_S, but the page is open: still logged in
            assert any(s.operator == "bob" and s.pages == 1 for s in demo.dashboard._sessions.values())
        await asyncio.sleep(1.5)
        async with http.get(url + "api/history?device=load-1", ssl=tls(demo)) as r:
            assert r.status == 401  # the page closed, the session went with it
