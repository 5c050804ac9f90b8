-- Per kept key: the keys removed as its exact (distance 0) or near duplicates, their distances, how many
WITH removed AS (
    SELECT
        s.duplicate_of AS kept_key,
        -- status rows of removed samples carry no key: it is the file's index and the input row
        coalesce(s.key, printf('%05d%09d', i.index, s.input_row)) AS removed_key,
        CASE WHEN s.status = 'duplicate_image' THEN 0 ELSE s.distance END AS distance
    FROM status s
    LEFT JOIN inputs i ON i.path = s.input_file
    WHERE s.status IN ('duplicate_image', 'near_duplicate')
)
SELECT
    kept_key,
    list(removed_key ORDER BY removed_key) AS removed_keys,
    list(distance ORDER BY removed_key) AS distances,
    count(*) AS removed
FROM removed
GROUP BY kept_key
ORDER BY removed DESC, kept_key;
