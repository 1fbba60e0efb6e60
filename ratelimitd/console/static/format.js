// Numbers, money and times as people read them; times in the viewer's own time zone.

const compact = new Intl.NumberFormat(undefined, { notation: "compact", maximumFractionDigits: 1 });
const whole = new Intl.NumberFormat(undefined);
const usd = new Intl.NumberFormat(undefined, { style: "currency", currency: "USD", minimumFractionDigits: 2 });
const dateTime = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short" });
const clock = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });
const day = new Intl.DateTimeFormat(undefined, { month: "short", day: "numeric" });

export const count = (n) => (Math.abs(Number(n)) >= 1000 ? compact.format(Number(n)) : whole.format(Number(n || 0)));
export const money = (n) => usd.format(Number(n || 0));
export const when = (ms) => (Number(ms) > 0 ? dateTime.format(new Date(Number(ms))) : "never");
export const clockTime = (ms) => clock.format(new Date(Number(ms)));
export const dayOf = (ms) => day.format(new Date(Number(ms)));
export const zone = () => Intl.DateTimeFormat().resolvedOptions().timeZone;
export const roleName = (role) => String(role || "").replace("ROLE_", "").toLowerCase();
