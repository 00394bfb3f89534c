"""Store-and-forward for devices without presence ([00115]-[00120], [00144]).

An SMTP server (:mod:`.smtp`) takes grid payloads as mail (:mod:`.mail`) from known parties
only, a durable queue (:mod:`.queue`) keeps them, and an XMPP client (:mod:`.service`) delivers
queued commands the moment a device's presence returns and passes mailed device data on.
"""
