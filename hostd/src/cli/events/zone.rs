//! Time stamps of events: time of day in the local time zone.

/// The time zone time stamps are shown in.
#[derive(Debug, Clone)]
pub enum Zone {
    /// Local time is unknown: UTC, marked `Z`.
    Utc,
    /// The local time zone.
    Local(jiff::tz::TimeZone),
}

impl Zone {
    /// The local zone (`TZ`, else `/etc/localtime`), or UTC when it cannot be determined.
    pub fn local() -> Self {
        jiff::tz::TimeZone::try_system().map_or(Zone::Utc, Zone::Local)
    }

    /// `HH:MM:SS.mmm` of a Unix time in milliseconds (`Z` appended in UTC).
    pub fn clock(&self, unix_ms: i64) -> String {
        if let Zone::Local(zone) = self
            && let Ok(time) = jiff::Timestamp::from_millisecond(unix_ms)
        {
            return time
                .to_zoned(zone.clone())
                .strftime("%H:%M:%S%.3f")
                .to_string();
        }
        // UTC, also for times jiff cannot represent.
        let of_day = unix_ms.rem_euclid(86_400_000);
        format!(
            "{:02}:{:02}:{:02}.{:03}Z",
            of_day / 3_600_000,
            of_day / 60_000 % 60,
            of_day / 1000 % 60,
            of_day % 1000
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2023-11-14 22:13:20 UTC.
    const T: i64 = 1_700_000_000_000;

    #[test]
    fn utc_clock_is_marked() {
        assert_eq!(Zone::Utc.clock(T + 42), "22:13:20.042Z");
        assert_eq!(Zone::Utc.clock(-1), "23:59:59.999Z");
        assert_eq!(Zone::Utc.clock(i64::MAX).len(), 13);
    }

    #[test]
    fn local_clock_follows_the_zone() {
        let berlin = Zone::Local(jiff::tz::TimeZone::posix("CET-1CEST,M3.5.0,M10.5.0/3").unwrap());
        // 2023-11-14: winter (+1 h); 2023-07-01 12:00 UTC: summer (+2 h).
        assert_eq!(berlin.clock(T + 42), "23:13:20.042");
        assert_eq!(berlin.clock(1_688_212_800_000), "14:00:00.000");
        let sydney =
            Zone::Local(jiff::tz::TimeZone::posix("AEST-10AEDT,M10.1.0,M4.1.0/3").unwrap());
        assert_eq!(sydney.clock(T), "09:13:20.000");
        // Beyond what a calendar can hold: UTC arithmetic, marked.
        assert_eq!(berlin.clock(i64::MAX).len(), 13);
    }
}
