"""gridpresence: a power grid's devices as an instant-messaging network on XMPP.

Packages are named for where their code runs, and imports flow one way: a package imports only
packages in a layer below its own, never a peer in its own layer nor one above
(``tests/test_layers.py`` checks every import, at module level, under ``TYPE_CHECKING`` and
inside functions alike). Lowest first:

=========================  ==========================================================================
protocol                   the wire: typed payloads, their XML and stanza form, roster groups
words                      every sentence and table shown to people (CLI, chat answers, console)
security, rules            OpenPGP keys, signatures, the command gate; the fault-detection engine
config                     the fleet file
physics                    the simulated IEDs' physics
transport                  how bytes reach the grid: c2s/BOSH connection policy, TLS trust, mail
xmpp                       what every party's session needs: login, key announcement, slixmpp fixes
server                     Prosody as a child process, accounts and rosters
device, operator           the device bot and its desks; the operator library scripts use (peers:
                           neither imports the other)
gateway, services          IEDs behind a field gateway; the other bots (billing, watchdog,
                           manufacturer, console, the e-mail relay)
host                       the process that hosts many bots, the grid's life cycle, the demo
cli                        the ``gridpresence`` command; nothing but ``__main__`` imports it
__main__                   the program's entry (``python -m gridpresence``, the console script)
=========================  ==========================================================================
"""

__version__ = "0.1.0"

# The import rule above, as data (tests/test_layers.py reads it). Top-level modules count as
# packages of their own name ("config" for gridpresence/config.py).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("protocol",),
    ("words",),
    ("security", "rules"),
    ("config",),
    ("physics",),
    ("transport",),
    ("xmpp",),
    ("server",),
    ("device", "operator"),
    ("gateway", "services"),
    ("host",),
    ("cli",),
    ("__main__",),
)
