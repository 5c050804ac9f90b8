-- Input rows per status with their share of the input, 'ok' (written) first
SELECT
    status,
    count(*) AS rows,
    round(100.0 * count(*) / sum(count(*)) OVER (), 2) AS pct_of_input
FROM status
GROUP BY status
ORDER BY status <> 'ok', rows DESC, status;
