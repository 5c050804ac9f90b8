-- Rows not written (status other than 'ok') by URL host and status, most frequent first
WITH reject AS (
    SELECT
        -- scheme://[user@]host[:port]...; NULL for a missing URL or one without a host
        nullif(lower(regexp_extract(
            url, '^[A-Za-z][A-Za-z0-9+.-]*://(?:[^/?#@]*@)?(\[[^\]/]*\]|[^:/?#]*)', 1)), '') AS host,
        status
    FROM status
    WHERE status <> 'ok'
)
SELECT
    host,
    status,
    count(*) AS rows,
    round(100.0 * count(*) / (SELECT count(*) FROM status), 2) AS pct_of_input
FROM reject
GROUP BY host, status
ORDER BY rows DESC, host NULLS LAST, status;
