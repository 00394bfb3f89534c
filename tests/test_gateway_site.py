"""Site files, point maps and turning a poll into presence: clear errors, nothing invalid out."""

from __future__ import annotations

import copy
import random
import tomllib

import pytest

from gridpresence.gateway.driver import Quality, Reading
from gridpresence.gateway.points import Point
from gridpresence.gateway.report import ReadingError, build_report, extra_readings
from gridpresence.gateway.site import SiteError, load_site, parse_site, shipped_maps
from gridpresence.protocol import Breaker, DeviceState

SITE = """
[[ieds]]
name = "meter-1"
kind = "meter"
map = "generic-modbus-meter"
link = { protocol = "modbus-tcp", host = "10.0.0.5", unit = 1 }

[[ieds]]
name = "load-1"
kind = "load"
map = "modbus-load-controller"
link = { protocol = "modbus-rtu", device = "/dev/ttyUSB0", unit = 7 }

[[ieds]]
name = "meter-3"
kind = "meter"
map = "my-meter"
link = { protocol = "modbus-tcp", host = "10.0.0.6" }

[[ieds]]
name = "brk-1"
kind = "breaker"
map = "dnp3-breaker"
link = { protocol = "dnp3-tcp", host = "10.0.0.9", outstation = 4 }

[maps.my-meter]
protocol = "modbus"
points = { kw = { table = "holding", address = 0, type = "f32" } }
telemetry = { kw = "kw" }
"""


def test_a_site_loads_and_ready_maps_are_shipped(tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "site.toml"
    path.write_text(SITE)
    site = load_site(path)
    assert [i.name for i in site.ieds] == ["meter-1", "load-1", "meter-3", "brk-1"]
    assert set(shipped_maps()) >= {"generic-modbus-meter", "modbus-load-controller", "dnp3-breaker", "dnp3-generator"}
    assert site.map_for(site.ieds[2]).points["kw"].name == "kw"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["maps"]["my-meter"]["points"]["kw"].update(address=70000),
         "maps.my-meter.points.kw.address: Input should be less than or equal to 65535"),
        (lambda d: d["ieds"][2]["link"].update(port=0), "ieds[2] (meter-3).link.port: Input should be greater than or equal to 1"),
        (lambda d: d["ieds"][2].update(map="nope"), "ieds[2] (meter-3).map: no map named 'nope'"),
        (lambda d: d["ieds"][3].update(map="my-meter"), "ieds[3] (brk-1).map: 'my-meter' is a modbus map, the link is dnp3-tcp"),
        (lambda d: d["maps"]["my-meter"]["telemetry"].update(kw="kw_total"), "maps.my-meter.telemetry.kw: no point named 'kw_total'"),
        (lambda d: d["maps"]["my-meter"]["points"]["kw"].update(type="bool"), "maps.my-meter.points.kw: a register is not a bool"),
        (lambda d: d["maps"]["my-meter"]["points"]["kw"].update(table="binary_input", type=None) or d["maps"]["my-meter"]["points"]["kw"].pop("type"),
         "maps.my-meter.points.kw.table: 'binary_input' is not a modbus table"),
        (lambda d: d["ieds"][1].update(name="meter-1"), "ieds[1] (meter-1).name: 'meter-1' is used twice"),
        (lambda d: d["maps"]["my-meter"].update(commands={"shed": {"writes": [{"point": "kw", "value": 1}]}}), None),
    ],
)
def test_bad_site_files_name_the_field(change, message) -> None:  # noqa: ANN001
    data = tomllib.loads(SITE)
    change(data)
    if message is None:
        parse_site(data)  # a holding register may be written
        return
    with pytest.raises(SiteError) as err:
        parse_site(data, "site.toml")
    assert f"site.toml: {message}" in str(err.value)


def test_bad_files(tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(SiteError, match="no such site file"):
        load_site(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("[[ieds]\n")
    with pytest.raises(SiteError, match="not valid TOML"):
        load_site(tmp_path / "bad.toml")
    with pytest.raises(SiteError, match="cannot read"):
        load_site(tmp_path)


def _mutate(node: object, rng: random.Random) -> object:
    junk = [None, -1, 0, 70000, 1e308, float("nan"), "", "x" * 300, "modbus-tcp", [], {}, True, "kw", {"a": 1}]
    if isinstance(node, dict) and node and rng.random() < 0.8:
        key = rng.choice(list(node))
        roll = rng.random()
        if roll < 0.2:
            del node[key]
        elif roll < 0.5:
            node[key] = rng.choice(junk)
        else:
            node[key] = _mutate(node[key], rng)
        return node
    if isinstance(node, list) and node and rng.random() < 0.8:
        i = rng.randrange(len(node))
        node[i] = _mutate(node[i], rng) if rng.random() < 0.7 else rng.choice(junk)
        return node
    return rng.choice(junk)


def test_fuzzed_site_files_load_or_raise_the_site_error() -> None:
    rng = random.Random(15)
    base = tomllib.loads(SITE)
    loaded = 0
    for _ in range(400):
        data = copy.deepcopy(base)
        for _ in range(rng.randint(1, 3)):
            data = _mutate(data, rng)
        try:
            parse_site(data)
            loaded += 1
        except SiteError as exc:
            assert str(exc)
    assert loaded < 400  # the mutations do break sites (and each break was a SiteError)


def _ied(name: str):  # noqa: ANN202
    site = parse_site(tomllib.loads(SITE))
    ied = next(i for i in site.ieds if i.name == name)
    return ied, site.map_for(ied)


def test_a_poll_becomes_presence() -> None:
    ied, pmap = _ied("load-1")
    readings = {
        "kw": Reading(42.5), "capacity_kw": Reading(100.0), "load_pct": Reading(42.5),
        "running": Reading(True), "local": Reading(False), "run_hours": Reading(1200),
    }
    report = build_report(ied, pmap, readings, seq=3)
    assert report.state is DeviceState.ON and report.telemetry.kw == 42.5 and report.seq == 3
    assert extra_readings(pmap, readings) == {"run_hours": 1200.0}
    local = build_report(ied, pmap, {**readings, "local": Reading(True)})
    assert local.state is DeviceState.RESTRICTED and local.restriction is not None
    assert build_report(ied, pmap, {**readings, "running": Reading(False)}).state is DeviceState.OFF
    brk, bmap = _ied("brk-1")
    tripped = build_report(brk, bmap, {"kw": Reading(1.0), "load_pct": Reading(1.0), "closed": Reading(False),
                                        "tripped": Reading(True), "local": Reading(False)})
    assert tripped.telemetry.breaker is Breaker.TRIPPED


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"kw": Reading(float("nan"))}, "kw: Input should be a finite number"),
        ({"kw": Reading(2e7)}, "kw: Input should be less than or equal to 10000000"),
        ({"load_pct": Reading(-1.0)}, "load_pct: Input should be greater than or equal to 0"),
        ({"kw": Reading(None, Quality.BAD)}, "kw: point 'kw' is bad"),
        ({"running": Reading(True, Quality.COMM_LOST)}, "state: point 'running' is comm-lost"),
    ],
)
def test_bad_register_values_are_errors_never_presence(bad, message) -> None:  # noqa: ANN001
    ied, pmap = _ied("load-1")
    readings = {"kw": Reading(1.0), "capacity_kw": Reading(1.0), "load_pct": Reading(1.0),
                "running": Reading(True), "local": Reading(False), **bad}
    with pytest.raises(ReadingError) as err:
        build_report(ied, pmap, readings)
    assert message in str(err.value) and str(err.value).startswith("load-1: ")
    missing = dict(readings)
    del missing["kw"]
    with pytest.raises(ReadingError, match="kw: point 'kw' was not read"):
        build_report(ied, pmap, missing)


def test_the_readme_example_site_loads() -> None:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    block = text.split("## Real IEDs")[1].split("```toml\n")[1].split("```")[0]
    site = parse_site(tomllib.loads(block), "README")
    assert [i.link.protocol for i in site.ieds] == ["modbus-tcp", "dnp3-tcp", "modbus-rtu"]


@pytest.mark.parametrize(("raw", "scale", "offset", "shown"), [
    (388, 0.1, 0.0, 38.8), (7, 0.01, 0.0, 0.07), (1234, 0.1, -40.0, 83.4), (3, 1.0, 0.5, 3.5),
])
def test_a_scaled_register_is_the_decimal_it_stands_for(raw: int, scale: float, offset: float, shown: float) -> None:
    """A u16 of 388 at scale 0.1 is 38.8 on the wire, not 38.800000000000004."""
    point = Point(table="holding", address=0, type="u16", scale=scale, offset=offset)
    value = point.to_engineering(raw)
    assert value == shown and repr(value) == repr(shown)
    assert round(point.to_raw(value)) == raw
