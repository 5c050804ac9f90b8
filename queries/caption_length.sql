-- Written samples by caption length in characters, bucketed (a missing caption counts as 0)
WITH caption AS (
    SELECT coalesce(length(caption), 0) AS chars FROM metadata
),
bucket(ord, bucket, lo, hi) AS (
    VALUES (1, '0', 0, 1), (2, '1-19', 1, 20), (3, '20-49', 20, 50), (4, '50-99', 50, 100),
           (5, '100-199', 100, 200), (6, '200+', 200, NULL)
)
-- Left join from the bucket list so that empty buckets still show, with 0.
SELECT
    b.bucket AS caption_chars,
    count(c.chars) AS samples,
    round(100.0 * count(c.chars) / nullif(sum(count(c.chars)) OVER (), 0), 2) AS pct
FROM bucket b
LEFT JOIN caption c ON c.chars >= b.lo AND (b.hi IS NULL OR c.chars < b.hi)
GROUP BY b.ord, b.bucket
ORDER BY b.ord;
