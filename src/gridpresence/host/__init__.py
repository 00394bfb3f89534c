"""The process that hosts many bots: ``fleet`` (a fleet's bots in one event loop), ``grid``
(server, accounts, connection file and bots coming up and going down together), ``demo`` (the
narrated scenario), ``signals`` (orderly stops). May import: every layer below except cli.
"""
