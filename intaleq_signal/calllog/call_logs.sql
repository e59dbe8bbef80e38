-- intaleq-signal call log. One row per call session.
-- The server runs this at start (CREATE TABLE IF NOT EXISTS), so the table
-- exists as soon as the daemon has reached the database once.
-- Times are UTC (the server's MySQL sessions use time_zone '+00:00') with
-- milliseconds: the moments the events happened, not the moments of the writes.
-- node_id is the instance (NODE_ID) that owns the row. The media columns tell
-- which calls really connected (what the apps report with media_state):
-- media_connected_at, when both participants had reported "connected";
-- driver_media_at and passenger_media_at, each one's first "connected";
-- driver_candidate and passenger_candidate, each one's latest selected ICE
-- candidate type (host, srflx, prflx, relay); media_failures, the "failed"
-- reports. A table made before a column existed gets it (and its index)
-- added by the server at start.
CREATE TABLE IF NOT EXISTS call_logs (
    id INT UNSIGNED NOT NULL AUTO_INCREMENT,
    session_id VARCHAR(36) NOT NULL,
    ride_id VARCHAR(255) NOT NULL,
    driver_id VARCHAR(255) NOT NULL,
    passenger_id VARCHAR(255) NOT NULL,
    status VARCHAR(50) NOT NULL DEFAULT 'created',
    initiated_by VARCHAR(255) NULL,
    end_reason VARCHAR(255) NULL,
    created_at TIMESTAMP(3) NULL,
    connected_at TIMESTAMP(3) NULL,
    ended_at TIMESTAMP(3) NULL,
    node_id VARCHAR(255) NULL,
    media_connected_at TIMESTAMP(3) NULL,
    driver_candidate VARCHAR(16) NULL,
    passenger_candidate VARCHAR(16) NULL,
    media_failures INT UNSIGNED NOT NULL DEFAULT 0,
    driver_media_at TIMESTAMP(3) NULL,
    passenger_media_at TIMESTAMP(3) NULL,
    PRIMARY KEY (id),
    UNIQUE KEY uq_call_logs_session_id (session_id),
    KEY idx_call_logs_ride_id (ride_id),
    KEY idx_call_logs_status (status),
    KEY idx_call_logs_node_status (node_id, status, ended_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
