"""``register_stanza_plugin`` skipped when its registration is already in place.

slixmpp's plugins register their stanza plugins in ``plugin_init``, that is once per stream: a
host of thousands of identities (xmpp/component.py) made the same ~20 registrations for each.
Each call copies the parent class's four plugin maps, and one for an iterable plugin builds a
new ``Multi`` class (~1 KiB, kept). A call whose every entry is already what it would write is
skipped; any other runs slixmpp's own function, so what is registered is always slixmpp's.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from slixmpp.xmlstream import stanzabase

_slixmpp_register = stanzabase.register_stanza_plugin
# The plugins our parties load (their modules bind the function's name when imported).
_PLUGINS = ("xep_0004", "xep_0030", "xep_0050", "xep_0060", "xep_0082", "xep_0092", "xep_0115", "xep_0128",
            "xep_0131", "xep_0199")


def in_place(stanza: Any, plugin: Any, iterable: bool = False, overrides: bool = False) -> bool:
    """Whether the parent class's own maps already hold all that this registration writes."""
    # Written without generators: it runs ~15 times per hosted identity's start.
    own = stanza.__dict__
    attribs, tags = own.get("plugin_attrib_map"), own.get("plugin_tag_map")
    if attribs is None or tags is None or "plugin_iterables" not in own or "plugin_overrides" not in own:
        return False  # still its ancestor's maps: slixmpp copies them
    if attribs.get(plugin.plugin_attrib) is not plugin or tags.get(f"{{{plugin.namespace}}}{plugin.name}") is not plugin:
        return False
    if iterable:
        if plugin not in own["plugin_iterables"]:
            return False
        if plugin.plugin_multi_attrib:
            multi = attribs.get(plugin.plugin_multi_attrib)
            if getattr(multi, "_multistanza", None) is not plugin or not in_place(stanza, multi):
                return False
    if overrides:
        kept = own["plugin_overrides"]
        for interface in plugin.overrides:
            if kept.get(interface) != plugin.plugin_attrib:
                return False
    return True


def register_stanza_plugin(stanza: Any, plugin: Any, iterable: bool = False, overrides: bool = False) -> None:
    if not in_place(stanza, plugin, iterable, overrides):
        _slixmpp_register(stanza, plugin, iterable, overrides)


for _name in _PLUGINS:
    importlib.import_module(f"slixmpp.plugins.{_name}")
for _module in list(sys.modules.values()):
    if getattr(_module, "register_stanza_plugin", None) is _slixmpp_register:
        _module.register_stanza_plugin = register_stanza_plugin  # type: ignore[attr-defined]
