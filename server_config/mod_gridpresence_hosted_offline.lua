-- Offline messages for hosted devices (gridpresence's xmpp/component.py), as mod_offline keeps
-- them for an account. Loaded on the component's host (devices.DOMAIN).
--
-- A message to an offline c2s device bot is kept by mod_offline and delivered at its next
-- login. A hosted identity has no account: while its component is not connected, mod_component
-- would answer every message "Component unavailable". So, while the component is down, this
-- module keeps what mod_message hands to mod_offline for an account (chat, normal or untyped
-- messages; 0.12's mod_offline keeps them all, with no store hints) in an archive store of
-- its own (persistent over a Prosody restart), and answers what an account's server answers
-- otherwise (an error or a headline: dropped; groupchat: service-unavailable).
--
-- Delivery: the component's handshake is not the identities' login (xmpp/component.py brings
-- them up a few at a time after it, and bounces a stanza for one not yet up). So, as mod_offline
-- waits for a session's initial presence, this module waits for each identity with kept messages
-- to answer a ping (XEP-0199) from the server, retried with back-off, and then sends what is kept,
-- oldest first, with a delay stamp (XEP-0203) as mod_offline adds, and deletes it. Until then,
-- new messages for that identity are kept behind the older ones (order is kept). An identity
-- that has not answered within gridpresence_offline_wait seconds of the component's return is
-- not hosted any more: its kept messages go back to their senders as service-unavailable.
--
-- Bounded (mod_offline has no bound): gridpresence_offline_max_per_jid per identity and
-- gridpresence_offline_max_total in all; a message over either is answered resource-constraint.
-- Presence and iq are never kept: mod_component answers them as before.
if module:get_host_type() ~= "component" then
	module:log("error", "mod_gridpresence_hosted_offline belongs on the devices' component host");
	return;
end

local st = require "util.stanza";
local datetime = require "util.datetime";
local jid_split = require "util.jid".split;
local uuid = require "util.uuid".generate;

local kept = module:open_store("gridpresence_offline", "archive");
local max_per_jid = module:get_option_number("gridpresence_offline_max_per_jid", 100);
local max_total = module:get_option_number("gridpresence_offline_max_total", 10000);
local wait_s = module:get_option_number("gridpresence_offline_wait", 300);
local ping_first_s, ping_max_s, ping_timeout_s = 0.25, 5, 10;

-- The server's own domain (the component is devices.DOMAIN): pings come from it, and their
-- answers are tracked there.
local server = module:get_option_string("gridpresence_server_host", module.host:match("^[^.]+%.(.+)$"));
local on_server = module:context(server);

local session = nil; -- the component's connection while it is authenticated
local counts = {}; -- node -> messages kept for it
local total = 0;
local waiting = {}; -- node -> generation of the delivery waiting for it (the component is back)
local generation = 0; -- one per component session: a delivery of an earlier one stops

do -- what an earlier run kept (also after a reload)
	for node in kept:users() do
		local items = kept:find(node);
		local n = 0;
		if items then for _ in items do n = n + 1; end end
		if n > 0 then counts[node], total = n, total + n; end
	end
	if total > 0 then module:log("info", "%d kept messages for %s's identities", total, module.host); end
end

local function forget(node)
	total = total - (counts[node] or 0);
	counts[node] = nil;
	waiting[node] = nil;
	kept:delete(node);
end

local function deliver(node)
	if not session then return; end
	local items, err = kept:find(node);
	local sent = 0;
	if not items and err then module:log("warn", "kept messages for %s unreadable: %s", node, tostring(err)); end
	for _, stanza, when in items or function() end do
		stanza:tag("delay", { xmlns = "urn:xmpp:delay", from = module.host, stamp = datetime.datetime(when) }):up();
		stanza.attr.xmlns = nil;
		session.send(stanza);
		sent = sent + 1;
	end
	forget(node); -- and what arrives next goes straight on
	module:log("debug", "%d kept messages delivered to %s@%s", sent, node, module.host);
end

local function give_back(node)
	local items = kept:find(node);
	if items then
		for _, stanza in items do
			module:send(st.error_reply(stanza, "cancel", "service-unavailable",
				"Not hosted after its host returned", module.host));
		end
	end
	forget(node);
	module:log("info", "%s@%s not back within %d s of its host: kept messages returned", node, module.host, wait_s);
end

-- Pings in flight at once: Prosody's send_iq tracks 256 per module and rejects the oldest beyond
-- that, so thousands of identities with kept messages (a fan-out during the outage) wait in line.
local max_pings = 128;
local inflight = 0;
local line = { head = 1, tail = 0 }; -- pings waiting for a slot, oldest first

local function release()
	inflight = inflight - 1;
	if line.head <= line.tail then
		local ping = line[line.head];
		line[line.head], line.head = nil, line.head + 1;
		inflight = inflight + 1;
		ping();
	end
end

local function in_turn(ping)
	if inflight < max_pings then
		inflight = inflight + 1;
		ping();
	else
		line.tail = line.tail + 1;
		line[line.tail] = ping;
	end
end

-- Wait for `node` to be up on the component (it answers a ping), then deliver.
local function await_identity(node, gen)
	local started = os.time();
	local delay = ping_first_s;
	local function try()
		in_turn(function()
			if waiting[node] ~= gen or not session then release(); return; end
			local ping = st.iq({ type = "get", from = server, to = node .. "@" .. module.host, id = "gp-offline-" .. uuid() })
				:tag("ping", { xmlns = "urn:xmpp:ping" });
			on_server:send_iq(ping, nil, ping_timeout_s):next(function()
				release();
				if waiting[node] == gen and session then deliver(node); end
			end, function()
				release();
				if waiting[node] ~= gen or not session then return; end
				if os.time() - started >= wait_s then give_back(node); return; end
				module:add_timer(delay, try);
				delay = math.min(delay * 2, ping_max_s);
			end);
		end);
	end
	try();
end

local function back(event)
	session = event.session;
	generation = generation + 1;
	for node in pairs(counts) do
		waiting[node] = generation;
		await_identity(node, generation);
	end
end
module:hook("component-authenticated", back);

module:hook("component-disconnected", function()
	session = nil;
	waiting = {};
end);

do -- loaded (or reloaded) while the component is connected
	local component = prosody.hosts[module.host].modules.component;
	if component and component.connected and component.session then
		back({ session = component.session });
	end
end

local function keep(event)
	if session and next(waiting) == nil then return nil; end -- connected: mod_component sends it on
	local origin, stanza = event.origin, event.stanza;
	local node = jid_split(stanza.attr.to);
	if not node then return nil; end
	if session and not waiting[node] then return nil; end -- connected, nothing kept before it
	local t = stanza.attr.type;
	if t == "error" or t == "headline" then return true; end -- as for an account: dropped
	if t == "groupchat" then
		origin.send(st.error_reply(stanza, "cancel", "service-unavailable", nil, module.host));
		return true;
	end
	if (counts[node] or 0) >= max_per_jid or total >= max_total then
		origin.send(st.error_reply(stanza, "wait", "resource-constraint",
			"Too many messages kept for this device while its host is down", module.host));
		return true;
	end
	local ok, err = kept:append(node, nil, stanza, os.time(), "");
	if not ok then
		module:log("warn", "could not keep a message for %s: %s", node, tostring(err));
		origin.send(st.error_reply(stanza, "wait", "internal-server-error", "Could not keep the message", module.host));
		return true;
	end
	counts[node] = (counts[node] or 0) + 1;
	total = total + 1;
	return true;
end
module:hook("message/bare", keep, 10);
module:hook("message/full", keep, 10);
