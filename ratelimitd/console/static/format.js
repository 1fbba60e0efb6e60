// Numbers, money and times as people read them; times in the viewer's own time zone.
// The API's JSON (proto3 JSON, as Connect sends it) writes a Timestamp as an RFC 3339
// string (absent: never), a Duration as seconds ("0.120s"), and money as integer
// micro-dollars (*UsdMicros, 64-bit: a string); these read and write them.

export const msOf = (stamp) => (stamp ? Date.parse(stamp) : 0);
export const stampOf = (ms) => new Date(ms).toISOString();
export const durationMs = (span) => (span ? Math.round(parseFloat(span) * 1000) : 0);
export const usdOf = (micros) => Number(micros || 0) / 1_000_000;
export const microsOf = (usd) => String(Math.round(Number(usd) * 1_000_000));

const compact = new Intl.NumberFormat(undefined, { notation: "compact", maximumFractionDigits: 1 });
const whole = new Intl.NumberFormat(undefined);
const usd = new Intl.NumberFormat(undefined, { style: "currency", currency: "USD", minimumFractionDigits: 2 });
const dateTime = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short" });
const clock = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });
const day = new Intl.DateTimeFormat(undefined, { month: "short", day: "numeric" });

export const count = (n) => (Math.abs(Number(n)) >= 1000 ? compact.format(Number(n)) : whole.format(Number(n || 0)));
export const money = (dollars) => usd.format(Number(dollars || 0));
export const when = (stamp) => (msOf(stamp) > 0 ? dateTime.format(new Date(msOf(stamp))) : "never");
export const clockTime = (ms) => clock.format(new Date(Number(ms)));
export const dayOf = (ms) => day.format(new Date(Number(ms)));
export const zone = () => Intl.DateTimeFormat().resolvedOptions().timeZone;
export const roleName = (role) => String(role || "").replace("ROLE_", "").toLowerCase();
