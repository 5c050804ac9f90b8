-- Rows removed as overlapping an excluded benchmark set, per set, with up to 3 excluded images they matched
SELECT
    overlap_set,
    count(*) AS rows,
    count(DISTINCT duplicate_of) AS excluded_images,
    list(DISTINCT duplicate_of ORDER BY duplicate_of)[1:3] AS examples
FROM status
WHERE status = 'benchmark_overlap'
GROUP BY overlap_set
ORDER BY rows DESC, overlap_set;
