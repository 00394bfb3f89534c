-- Hosted devices (gridpresence's xmpp/component.py) are JIDs of an external component, with no
-- session here. When a c2s device's connection drops, its session ends and Prosody tells its
-- subscribers it is unavailable; when the component's connection drops without the identities'
-- goodbyes (the hosting process crashed, was killed, lost its socket), nothing would: every
-- operator's client would go on showing them online with their last status. So: this module
-- follows which hosted JIDs the component last said were available (their presence passes
-- here on its way to local users), and when the component disconnects, each available local
-- session whose roster is subscribed to one of them gets its unavailable presence, with a
-- status as Prosody gives a c2s session that dropped ("Disconnected: REASON"). Identities
-- that said goodbye first are not told again.
if module:get_host_type() ~= "local" then return end

local st = require "util.stanza";

local component = module:get_option_string("gridpresence_component_host");
if not component or component == "" then return end

-- hosted bare JID -> the full JID its last presence through here came from, while available
-- (its resource is the component's link session's: the unavailable must come from it, as a
-- client drops only the resource an unavailable names)
local available = {};

-- The bare JID by a plain find: the component's own JIDs need no nodeprep, and this keeps the
-- watch near 0.6 us per presence (util.jid.bare on every one: 2.6 us, lua5.4).
local function bare_of(from)
	local slash = from:find("/", 1, true);
	if slash then return from:sub(1, slash - 1); end
	return from;
end

local function track(event)
	local origin, stanza = event.origin, event.stanza;
	if origin.type ~= "component" or origin.host ~= component then return nil; end
	local ptype, from = stanza.attr.type, stanza.attr.from;
	if not from then return nil; end
	if ptype == nil then
		available[bare_of(from)] = from;
	elseif ptype == "unavailable" then
		local bare = bare_of(from);
		if available[bare] == from or bare == from then available[bare] = nil; end
	end
	return nil; -- only watching: mod_presence delivers it
end
module:hook("presence/bare", track, 1000);
module:hook("presence/full", track, 1000);

local function gone(event)
	local left = available;
	available = {};
	if next(left) == nil then return; end
	local status = "Disconnected: " .. tostring(event.reason or "component connection closed");
	local told = 0;
	for _, user in pairs(prosody.hosts[module.host].sessions or {}) do
		for _, session in pairs(user.sessions or {}) do
			if session.presence and session.roster then
				for contact, item in pairs(session.roster) do
					if contact and left[contact] and (item.subscription == "both" or item.subscription == "to") then
						session.send(st.presence({ from = left[contact], to = session.full_jid, type = "unavailable" })
							:text_tag("status", status));
						told = told + 1;
					end
				end
			end
		end
	end
	module:log("info", "%s disconnected: %d unavailable presences sent for its identities", component, told);
end

-- The component's host may be activated after this one (hosts come up in no fixed order).
local hooked = false;
local function hook_component()
	if hooked or not prosody.hosts[component] then return; end
	hooked = true;
	module:context(component):hook("component-disconnected", gone);
end
hook_component();
module:hook_global("host-activated", function(host)
	if host == component then hook_component(); end
end);
