-- Per surviving image: the keys removed as its exact (distance 0) or near duplicates, directly or down a chain, their distances, how many
WITH RECURSIVE removed AS (
    SELECT
        row_number() OVER () AS rid,
        -- status rows of removed samples carry no key: it is the file's index and the input row
        coalesce(s.key, printf('%05d%09d', i.index, s.input_row)) AS removed_key,
        s.duplicate_of AS winner,
        s.status,
        CASE WHEN s.status = 'duplicate_image' THEN 0 ELSE s.distance END AS distance
    FROM status s
    LEFT JOIN inputs i ON i.path = s.input_file
    WHERE s.status IN ('duplicate_image', 'near_duplicate', 'benchmark_overlap')
),
-- A duplicate's winner can itself lose later (an exact copy's smallest key to a larger near-copy,
-- or to a benchmark image): follow duplicate_of until an image that stayed, or an excluded image.
chain AS (
    SELECT rid, winner AS kept_key, 0 AS hops FROM removed WHERE status <> 'benchmark_overlap'
    UNION ALL
    SELECT c.rid, r.winner, c.hops + 1
    FROM chain c JOIN removed r ON r.removed_key = c.kept_key
    WHERE c.hops < 64
),
survivor AS (
    SELECT rid, arg_max(kept_key, hops) AS kept_key FROM chain GROUP BY rid
)
SELECT
    v.kept_key,
    list(r.removed_key ORDER BY r.removed_key) AS removed_keys,
    list(r.distance ORDER BY r.removed_key) AS distances,  -- to the image each was matched with
    count(*) AS removed
FROM survivor v
JOIN removed r USING (rid)
GROUP BY v.kept_key
ORDER BY removed DESC, v.kept_key;
