-- Rows not written (status other than 'ok') by status and reason, most frequent first
SELECT
    status,
    reason,
    count(*) AS rows,
    round(100.0 * count(*) / (SELECT count(*) FROM status), 2) AS pct_of_input
FROM status
WHERE status <> 'ok'
GROUP BY status, reason
ORDER BY rows DESC, status, reason;
