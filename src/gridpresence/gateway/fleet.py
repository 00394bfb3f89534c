"""A site's IEDs as devices of the fleet: ``[[sites]]`` in a fleet file gives them accounts,
roster entries, serials and pinned issuer keys as ``up`` gives its bots; the gateway hosts them."""

from __future__ import annotations

from gridpresence.config import DeviceSpec, Fleet, FleetError
from gridpresence.gateway.site import IedSpec, Site, SiteError, load_site


def device_spec(ied: IedSpec) -> DeviceSpec:
    """The fleet's view of an IED: the same name, kind, serial and refresh as a device bot."""
    fields = dict(name=ied.name, display_name=ied.display_name, kind=ied.kind, rated_kw=ied.rated_kw,
                  critical=ied.critical, refresh_s=ied.refresh_s,
                  hosting="c2s")  # the gateway logs its IEDs in over c2s/BOSH, whatever the fleet hosts
    if ied.serial is not None:
        fields["serial"] = ied.serial
    return DeviceSpec.model_validate(fields)


def with_site(fleet: Fleet, site: Site, source: str = "site") -> Fleet:
    """``fleet`` with the site's IEDs among its devices; an IED already there (the fleet copy a
    grid keeps) must be the same device."""
    have = {d.name: d for d in fleet.devices}
    added: list[DeviceSpec] = []
    for i, ied in enumerate(site.ieds):
        spec = device_spec(ied)
        if ied.name in have:
            # (a fleet copy from before `hosting` existed names none: the same device all the same)
            if have[ied.name].model_copy(update={"hosting": spec.hosting}) != spec:
                raise FleetError(f"{source}: ieds[{i}] ({ied.name}).name: the fleet has another device of that name")
            continue
        added.append(spec)
    if not added:
        return fleet
    data = fleet.model_dump(mode="json")
    data["devices"] = [*data["devices"], *(d.model_dump(mode="json") for d in added)]
    try:
        return Fleet.model_validate(data)
    except ValueError as exc:
        raise FleetError(f"{source}: {exc}") from None


def with_sites(fleet: Fleet) -> tuple[Fleet, tuple[str, ...]]:
    """The fleet with every ``[[sites]]`` file's IEDs, and those IEDs' names (the gateway's)."""
    names: list[str] = []
    for i, ref in enumerate(fleet.sites):
        try:
            site = load_site(ref.path)
        except SiteError as exc:
            raise FleetError(f"sites[{i}].file: {exc}") from None
        fleet = with_site(fleet, site, str(ref.path))
        names += [ied.name for ied in site.ieds]
    return fleet, tuple(names)
